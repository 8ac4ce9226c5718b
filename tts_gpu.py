import time, statistics, tempfile
from pathlib import Path
import mlx.core as mx
from bench.kyutai import bench_tts, tts_config, _random_lm, _mimi, _tokenizer, TEXT
from voice.checkpoints import Checkpoint
from voice.tts import Synthesizer

print("ours standalone", bench_tts(40, None).row(), flush=True)
raw = tts_config()
with tempfile.TemporaryDirectory() as tmp:
    folder = Path(tmp)
    lm = _random_lm(raw, mx.bfloat16)
    voice = folder / "v.safetensors"
    mx.save_safetensors(str(voice), {"speaker_wavs": mx.random.normal((1, 512, 125)) * 0.1})
    ckpt = Checkpoint(None, raw, lm, _mimi(raw["dep_q"]), _tokenizer(folder))
    tts = Synthesizer(ckpt, voice, temperature=0.6)
    model = tts.model
    attrs = model.make_condition_attributes([voice], 2.0)
    for rep in range(2):
        times = []
        last = [time.perf_counter()]

        def on_frame(frame):
            pcm = ckpt.mimi.decode_step(frame[:, :, None])
            mx.eval(pcm)
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now

        entries = model.prepare_script([TEXT], padding_between=1)
        model.cfg_coef = 1.0
        t = time.perf_counter()
        model.generate(
            [entries], [attrs], cfg_is_no_prefix=False, cfg_is_no_text=False, on_frame=on_frame
        )
        print(
            "moshi generate: frames",
            len(times),
            "median ms",
            statistics.median(times[1:]) * 1000,
            "total",
            time.perf_counter() - t,
            flush=True,
        )
    for rep in range(2):
        times = []
        last = time.perf_counter()
        for f in tts.speak(TEXT):
            now = time.perf_counter()
            times.append(now - last)
            last = now
        print(
            "ours speak: frames",
            len(times),
            "median ms",
            statistics.median(times[1:]) * 1000,
            flush=True,
        )
