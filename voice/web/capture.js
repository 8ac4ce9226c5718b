// The microphone in 80 ms pieces of PCM16 (the context runs at 24 kHz, the API's rate).
class Capture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.piece = new Int16Array(1920);
    this.filled = 0;
  }
  process(inputs) {
    const channel = inputs[0] && inputs[0][0];
    if (channel) {
      for (let i = 0; i < channel.length; i++) {
        const s = Math.max(-1, Math.min(1, channel[i]));
        this.piece[this.filled++] = s < 0 ? s * 32768 : s * 32767;
        if (this.filled === this.piece.length) {
          this.port.postMessage(this.piece.buffer, [this.piece.buffer]);
          this.piece = new Int16Array(1920);
          this.filled = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor("capture", Capture);
