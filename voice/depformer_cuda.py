"""The fused depformer's steps (`voice.depformer_fused`) as custom CUDA kernels.

MLX on CUDA launches one kernel per operation and `mx.compile` fuses only elementwise
chains, so a depformer pass is ~75 kernels a codebook. Here each step is one kernel
through `mx.fast.cuda_kernel`, 18 a codebook: every block recomputes what is cheap (a
1024-element norm, the attention over at most 32 positions) so that no step needs the
grid to synchronise, and each warp computes output rows of the step's matrix product.
Products accumulate in float32; every value the plain path stores in the model's dtype
is rounded to it here too, so that greedy decoding picks moshi-mlx's tokens.
"""

from __future__ import annotations

import mlx.core as mx

from mlx_harmony.voice.depformer_fused import MAX_SLICES, Sampling, Shape

WARPS = 8  # a block of 256 threads: one output row per warp
SAMPLE_THREADS = 1024
BISECTIONS = 24  # the nucleus threshold to 2^-24 of the top probability

HEADER = r"""
__device__ __forceinline__ float tof(float v) { return v; }
__device__ __forceinline__ float tof(__half v) { return __half2float(v); }
__device__ __forceinline__ float tof(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename U> __device__ __forceinline__ U fromf(float v);
template <> __device__ __forceinline__ float fromf<float>(float v) { return v; }
template <> __device__ __forceinline__ __half fromf<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 fromf<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
// A value as the plain path stores it: rounded to the model's dtype.
template <typename U> __device__ __forceinline__ float rnd(float v) { return tof(fromf<U>(v)); }

struct Sum {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
template <typename Op> __device__ __forceinline__ float warp_reduce(float v, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, Sum{}); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, Max{}); }
// Every thread gets the block's reduction (`none` is its identity); `red` is 32 floats of
// shared memory.
template <typename Op> __device__ float block_reduce(float v, float* red, Op op, float none) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = warp_reduce(v, op);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  return warp_reduce(lane < warps ? red[lane] : none, op);
}
__device__ float block_sum(float v, float* red) { return block_reduce(v, red, Sum{}, 0.f); }
__device__ float block_max(float v, float* red) { return block_reduce(v, red, Max{}, -INFINITY); }
// One row of a row-major matrix times a vector in shared memory, summed over the warp.
template <typename U>
__device__ float warp_dot(const U* __restrict__ w, const float* __restrict__ x, int n) {
  constexpr int V = 16 / sizeof(U);
  const int lane = threadIdx.x & 31;
  float acc = 0.f;
  if (n % (32 * V) == 0 && (reinterpret_cast<unsigned long long>(w) & 15ull) == 0) {
    for (int i = lane * V; i < n; i += 32 * V) {
      const uint4 raw = *reinterpret_cast<const uint4*>(w + i);
      const U* v = reinterpret_cast<const U*>(&raw);
#pragma unroll
      for (int k = 0; k < V; k++) acc += tof(v[k]) * x[i + k];
    }
  } else {
    for (int i = lane; i < n; i += 32) acc += tof(w[i]) * x[i];
  }
  return warp_sum(acc);
}
// y = w · xs for the `rows` rows of w (n columns) this block owns, one row per warp.
template <typename U, typename WU>
__device__ void rows_out(U* y, const WU* __restrict__ w, const float* xs, int n, int rows) {
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row < rows) {
    const float acc = warp_dot<WU>(w + (size_t)row * n, xs, n);
    if ((threadIdx.x & 31) == 0) y[row] = fromf<U>(acc);
  }
}
// x RMS-normalised and scaled by w into shared `xs`, rounded as MLX's rms_norm writes it.
template <typename U, typename WU>
__device__ void normed(float* xs, const WU* w, float* red, int n, float eps) {
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xs[i] * xs[i];
  const float scale = rsqrtf(block_sum(ss, red) / n + eps);
  for (int i = threadIdx.x; i < n; i += blockDim.x) xs[i] = rnd<U>(xs[i] * scale * tof(w[i]));
  __syncthreads();
}
"""

# Each body runs with T (the activations' dtype: float32 where the backbone's output is,
# as in TTS 1.6B), W (the weights') and the shape's sizes as compile-time names.
QKV = r"""
  __shared__ float xs[D];
  __shared__ float red[32];
  for (int i = threadIdx.x; i < D; i += blockDim.x) xs[i] = tof(x[i]);
  normed<T>(xs, norm, red, D, EPS);
  rows_out(y, w, xs, D, 3 * D);
"""

EMBED_QKV = r"""
  __shared__ float xs[D];
  __shared__ float red[32];
  const size_t t = (size_t)token[0];
  for (int i = threadIdx.x; i < D; i += blockDim.x) {
    const float v = rnd<T>(tof(pre[i]) + tof(table[t * D + i]));
    xs[i] = v;
    if (blockIdx.x == 0) x_out[i] = fromf<T>(v);
  }
  normed<T>(xs, norm, red, D, EPS);
  rows_out(y, w, xs, D, 3 * D);
"""

# Attention of the new position over the slices so far (lane j of a warp scores position
# j), then the output projection and the residual; the cache comes out with the new
# position's keys and values written (outputs are new arrays: the cache is a value).
ATTEND = r"""
  constexpr int HD = D / H;
  __shared__ float q[D];
  __shared__ float o[D];
  __shared__ float probs[32][32];
  const int p = position[0];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < 2 * S * D; i += gridDim.x * blockDim.x) {
    const int which = i / (S * D), j = (i / D) % S, d = i % D;
    cache_out[i] = j == p ? qkv[(1 + which) * D + d] : cache[i];
  }
  for (int i = threadIdx.x; i < D; i += blockDim.x) q[i] = tof(qkv[i]);
  __syncthreads();
  const float scale = rsqrtf((float)HD);
  for (int h = warp; h < H; h += warps) {
    float score = -INFINITY;
    if (lane <= p) {
      const T* k = lane == p ? qkv + D + h * HD : cache + (size_t)lane * D + h * HD;
      float acc = 0.f;
      for (int d = 0; d < HD; d++) acc += q[h * HD + d] * tof(k[d]);
      score = acc * scale;
    }
    const float m = warp_max(score);
    const float e = lane <= p ? expf(score - m) : 0.f;
    probs[warp][lane] = e / warp_sum(e);
    __syncwarp();
    for (int d = lane; d < HD; d += 32) {
      float acc = 0.f;
      for (int j = 0; j <= p; j++) {
        const T* v = j == p ? qkv + 2 * D + h * HD : cache + (size_t)(S + j) * D + h * HD;
        acc += probs[warp][j] * tof(v[d]);
      }
      o[h * HD + d] = rnd<T>(acc);
    }
    __syncwarp();
  }
  __syncthreads();
  const int row = blockIdx.x * warps + warp;
  if (row < D) {
    const float acc = warp_dot<W>(w + (size_t)row * D, o, D);
    if (lane == 0) x_out[row] = fromf<T>(tof(x[row]) + rnd<T>(acc));
  }
"""

MLP_IN = r"""
  __shared__ float xs[D];
  __shared__ float red[32];
  for (int i = threadIdx.x; i < D; i += blockDim.x) xs[i] = tof(x[i]);
  normed<T>(xs, norm, red, D, EPS);
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row < F) {
    const float gate = rnd<T>(warp_dot<W>(w + (size_t)row * D, xs, D));
    const float value = rnd<T>(warp_dot<W>(w + (size_t)(F + row) * D, xs, D));
    const float silu = rnd<T>(gate / (1.f + expf(-gate)));
    if ((threadIdx.x & 31) == 0) h[row] = fromf<T>(silu * value);
  }
"""

MLP_OUT = r"""
  __shared__ float hs[F];
  for (int i = threadIdx.x; i < F; i += blockDim.x) hs[i] = tof(h[i]);
  __syncthreads();
  const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (row < D) {
    const float acc = warp_dot<W>(w + (size_t)row * F, hs, F);
    if ((threadIdx.x & 31) == 0) x_out[row] = fromf<T>(tof(x[row]) + rnd<T>(acc));
  }
"""

LOGITS = r"""
  __shared__ float xs[D];
  for (int i = threadIdx.x; i < D; i += blockDim.x) xs[i] = tof(x[i]);
  __syncthreads();
  rows_out(y, w, xs, D, V);
"""

# One block. The score is the logit (greedy) or logit / T + Gumbel noise; tokens outside
# the nucleus are excluded: with p the softmax, the threshold `lo` is found by bisection
# so that the tokens with p <= lo hold at most 1 - top_p of the probability (moshi-mlx's
# `top_p_sampling` drops exactly those, in ascending order, before the first whose
# cumulative sum passes 1 - top_p). Ties go to the lowest index, as MLX's argmax.
SAMPLE = r"""
  constexpr int PER = (V + THREADS - 1) / THREADS;
  __shared__ float red[32];
  __shared__ int redi[32];
  float score[PER];
  float prob[PER];
  float m = -INFINITY;
  for (int k = 0; k < PER; k++) {
    const int i = threadIdx.x + k * THREADS;
    score[k] = i < V ? (GREEDY ? tof(logits[i]) : tof(logits[i]) / TEMP) : -INFINITY;
    m = fmaxf(m, score[k]);
  }
  if constexpr (!GREEDY) {
    m = block_max(m, red);
    float total = 0.f;
    for (int k = 0; k < PER; k++) {
      prob[k] = threadIdx.x + k * THREADS < V ? expf(score[k] - m) : 0.f;
      total += prob[k];
    }
    total = block_sum(total, red);
    for (int k = 0; k < PER; k++) prob[k] /= total;
    float lo = 0.f, hi = 1.f / total;
    if (TOP_P < 1.f) {
      for (int it = 0; it < BISECTIONS; it++) {
        const float mid = 0.5f * (lo + hi);
        float below = 0.f;
        for (int k = 0; k < PER; k++) below += prob[k] <= mid ? prob[k] : 0.f;
        if (block_sum(below, red) > 1.f - TOP_P) hi = mid; else lo = mid;
      }
    } else {
      lo = -1.f;
    }
    for (int k = 0; k < PER; k++) {
      const int i = threadIdx.x + k * THREADS;
      score[k] = i < V && prob[k] > lo ? score[k] + noise[i] : -INFINITY;
    }
  }
  float best = -INFINITY;
  int arg = 0x7fffffff;
  for (int k = 0; k < PER; k++) {
    const int i = threadIdx.x + k * THREADS;
    if (i < V && (score[k] > best || (score[k] == best && i < arg))) { best = score[k]; arg = i; }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float b = __shfl_xor_sync(0xffffffffu, best, o);
    const int a = __shfl_xor_sync(0xffffffffu, arg, o);
    if (b > best || (b == best && a < arg)) { best = b; arg = a; }
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) { red[warp] = best; redi[warp] = arg; }
  __syncthreads();
  if (warp == 0) {
    best = lane < THREADS / 32 ? red[lane] : -INFINITY;
    arg = lane < THREADS / 32 ? redi[lane] : 0x7fffffff;
    for (int o = 16; o > 0; o >>= 1) {
      const float b = __shfl_xor_sync(0xffffffffu, best, o);
      const int a = __shfl_xor_sync(0xffffffffu, arg, o);
      if (b > best || (b == best && a < arg)) { best = b; arg = a; }
    }
    if (lane == 0) token[0] = arg == 0x7fffffff ? 0 : arg;
  }
"""


def _floats(**values: float) -> str:
    """Compile-time float constants (cuda_kernel's templates take ints, bools and types)."""
    return "".join(f"  constexpr float {k} = {float(v)!r}f;\n" for k, v in values.items())


class CudaOps:
    """`DepformerOps` as one CUDA kernel each (see the module docstring)."""

    name = "fused CUDA kernels"

    def __init__(self, shape: Shape, sampling: Sampling) -> None:
        if shape.slices > MAX_SLICES:
            raise ValueError(f"at most {MAX_SLICES} codebooks")
        self.shape, self.sampling = shape, sampling
        eps = _floats(EPS=shape.eps)
        greedy = sampling.temperature == 0
        sample = _floats(TEMP=sampling.temperature or 1.0, TOP_P=sampling.top_p)
        sample += f"  constexpr bool GREEDY = {str(greedy).lower()};\n"
        sample += f"  constexpr int BISECTIONS = {BISECTIONS};\n"

        def kernel(name: str, inputs: list[str], outputs: list[str], body: str):
            return mx.fast.cuda_kernel(
                name=f"mlx_harmony_depformer_{name}", input_names=inputs,
                output_names=outputs, source=body, header=HEADER,
            )  # fmt: skip

        self._qkv = kernel("qkv", ["x", "norm", "w"], ["y"], eps + QKV)
        self._embed = kernel(
            "embed_qkv", ["pre", "table", "token", "norm", "w"], ["x_out", "y"], eps + EMBED_QKV
        )
        self._attend = kernel(
            "attend", ["x", "qkv", "cache", "position", "w"], ["x_out", "cache_out"], ATTEND
        )
        self._mlp_in = kernel("mlp_in", ["x", "norm", "w"], ["h"], eps + MLP_IN)
        self._mlp_out = kernel("mlp_out", ["x", "h", "w"], ["x_out"], MLP_OUT)
        self._logits = kernel("logits", ["x", "w"], ["y"], LOGITS)
        if greedy:  # the body names the noise in a branch it never takes
            sample += "  const float* noise = nullptr;\n"
        inputs = ["logits"] if greedy else ["logits", "noise"]
        self._sample = kernel("sample", inputs, ["token"], sample + SAMPLE)
        self._positions = [mx.array([i], dtype=mx.int32) for i in range(shape.slices)]
        mx.eval(self._positions)

    def _run(self, fn, inputs: list[mx.array], outputs: list[tuple[int, mx.Dtype]], rows: int,
             sizes: str = "D"):  # fmt: skip
        s = self.shape
        known = {"D": s.dim, "H": s.heads, "F": s.hidden, "V": s.vocab, "S": s.slices}
        return fn(
            inputs=inputs,
            template=[("T", inputs[0].dtype), ("W", inputs[-1].dtype),
                      *((k, known[k]) for k in sizes)],
            grid=(-(-rows // WARPS) * WARPS * 32, 1, 1),
            threadgroup=(WARPS * 32, 1, 1),
            output_shapes=[(n,) for n, _ in outputs],
            output_dtypes=[d for _, d in outputs],
        )  # fmt: skip

    def qkv(self, x: mx.array, norm: mx.array, w: mx.array) -> mx.array:
        rows = 3 * self.shape.dim
        return self._run(self._qkv, [x, norm, w], [(rows, x.dtype)], rows)[0]

    def embed_qkv(
        self, pre: mx.array, table: mx.array, token: mx.array, norm: mx.array, w: mx.array
    ) -> tuple[mx.array, mx.array]:
        d = self.shape.dim
        outputs = [(d, pre.dtype), (3 * d, pre.dtype)]
        x, y = self._run(self._embed, [pre, table, token, norm, w], outputs, 3 * d)
        return x, y

    def attend(
        self, x: mx.array, qkv: mx.array, cache: mx.array, position: int, w: mx.array
    ) -> tuple[mx.array, mx.array]:
        d = self.shape.dim
        x, flat = self._run(
            self._attend, [x, qkv, cache, self._positions[position], w],
            [(d, x.dtype), (cache.size, cache.dtype)], d, "DHS",
        )  # fmt: skip
        return x, flat.reshape(cache.shape)

    def mlp_in(self, x: mx.array, norm: mx.array, w: mx.array) -> mx.array:
        f = self.shape.hidden
        return self._run(self._mlp_in, [x, norm, w], [(f, x.dtype)], f, "DF")[0]

    def mlp_out(self, x: mx.array, h: mx.array, w: mx.array) -> mx.array:
        d = self.shape.dim
        return self._run(self._mlp_out, [x, h, w], [(d, x.dtype)], d, "DF")[0]

    def logits(self, x: mx.array, w: mx.array) -> mx.array:
        v = self.shape.vocab
        return self._run(self._logits, [x, w], [(v, x.dtype)], v, "DV")[0]

    def sample(self, logits: mx.array, noise: mx.array | None) -> mx.array:
        s = self.shape
        inputs = [logits] if noise is None else [logits, noise]
        return self._sample(
            inputs=inputs,
            template=[("T", logits.dtype), ("V", s.vocab), ("THREADS", SAMPLE_THREADS)],
            grid=(SAMPLE_THREADS, 1, 1),
            threadgroup=(SAMPLE_THREADS, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[mx.int32],
        )[0]
