/* charnn's native generation kernel: a recurrent step and the sampling choice, in C.
 *
 * Built on first use by charnn/native/__init__.py with the system C compiler
 * (cc -O3 -shared), loaded with ctypes. Python prepares every weight (gates
 * reordered, biases folded, padded, split into parts, converted to bfloat16
 * pairs when asked); this file only runs them.
 *
 * Work split: the hidden units of every layer are cut into NPARTS fixed parts;
 * a part computes every gate of its units, so the cell update stays local.
 * One or two threads run the parts, and a row's numbers never depend on how
 * many threads ran them or on the other rows of the batch: each output is one
 * chain of multiply-adds in input order.
 *
 * Matrix products: AVX-512 kernels (fp32 FMA, or bf16 dot products with fp32
 * accumulation -- the arithmetic of PyTorch's bf16 autocast, in which charnn
 * trains and validates on CPUs) when the CPU has them, plain C otherwise.
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

#define MAXL 16
#define NPARTS 2
#define PANEL 64  /* weight columns per panel; charnn/native/__init__.py packs them so */
#define MAXV 4096
enum { LSTM = 0, GRU = 1, RNN = 2 };
enum { FP32 = 0, BF16 = 1 };

typedef struct {         /* a weight matrix (K rows of inputs) x (N outputs), in panels of 64 columns */
    const void *w;       /* per panel of width w (64, the last one less): fp32 K x w floats; bf16 K/2 x w x 2 halves */
    int K, N;            /* K even for bf16; N a multiple of 16 */
} mat_t;

typedef struct {
    int units0, units;           /* this part's hidden units [units0, units0 + units) */
    const float *table;          /* V x N0: layer 0's input rows (biases folded) */
    mat_t rec[MAXL];             /* LSTM/RNN: layer 0 [h]; layers > 0 [x, h, 1].  GRU: [h, 1] */
    mat_t inp[MAXL];             /* GRU only, layers > 0: [x, 1] */
} part_t;

typedef struct ctx ctx_t;
typedef struct {                 /* one generation call's arguments, read by every worker */
    int B, T, step_last;
    const int64_t *first_ids;    /* cn_step: the ids to feed */
    float *h, *c;                /* L x B x H, updated in place */
    float *logits;               /* B x V */
    const double *uniforms;      /* T x B, or NULL: greedy */
    int64_t *ids_out;            /* T x B */
    double *lp_out;              /* T x B or NULL */
    float inv_temp; int top_k; double top_p; int ban_unknown; int greedy;
    int error;
} job_t;

struct ctx {
    int cell, relu, L, H, V, VP, precision, avx512, bf16ok;
    part_t parts[NPARTS];
    const float *w_out;          /* (H + 1) x VP, fp32 */
    /* scratch (sized for max_rows rows) */
    int max_rows;
    float *xin[NPARTS], *gates[NPARTS], *gates2[NPARTS], *hn, *cn, *logits1;
    int64_t *ids1;                                            /* the worker's own logits and choices */
    uint32_t *xbf[NPARTS], *xbf2[NPARTS];
    /* the worker thread */
    int workers;
    pthread_t thread;
    pthread_mutex_t call_lock, sleep_lock;
    pthread_cond_t wake;
    atomic_int job_seq, done_seq, sleeping, quit, bar_count, bar_gen;
    job_t *job;
    int step_only;
};

/* -- vector math ------------------------------------------------------------------------------ */
__attribute__((target("avx512f")))
static inline __m512 exp_neg512(__m512 x) {           /* exp(x) for x <= 0 */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f")))
static inline __m512 tanh512(__m512 x) {
    __m512 a = _mm512_abs_ps(x);
    __m512 e = exp_neg512(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f)));
    __m512 t = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), e), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign));
}

__attribute__((target("avx512f")))
static void tanh_avx512(float *x, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, tanh512(_mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(x + i, m, tanh512(_mm512_maskz_loadu_ps(m, x + i)));
    }
}

static void tanh_n(const ctx_t *cx, float *x, int n) {
    if (cx->avx512) { tanh_avx512(x, n); return; }
    for (int i = 0; i < n; i++) x[i] = tanhf(x[i]);
}

/* -- matrix products: Y[b, :] (+)= X[b, :] W for rows b < B ------------------------------------- */
/* A tile: RB rows x NC 16-column chunks of Y, accumulated in registers over every input i. */
#define TILE(RB, NC, STEPS, WTYPE, LOAD_W, SET_X, MADD)                                            \
    do {                                                                                           \
        __m512 acc[RB][NC];                                                                        \
        for (int r = 0; r < RB; r++)                                                               \
            for (int q = 0; q < NC; q++)                                                           \
                acc[r][q] = init ? _mm512_loadu_ps(Y + (size_t)(b0 + r) * ldy + j0 + 16 * q)       \
                                 : _mm512_setzero_ps();                                            \
        for (int i = 0; i < STEPS; i++) {                                                          \
            WTYPE wv[NC];                                                                          \
            for (int q = 0; q < NC; q++) wv[q] = LOAD_W(i, q);                                     \
            for (int r = 0; r < RB; r++) {                                                         \
                const WTYPE xv = SET_X(X[(size_t)(b0 + r) * ldx + i]);                            \
                for (int q = 0; q < NC; q++) acc[r][q] = MADD(acc[r][q], xv, wv[q]);               \
            }                                                                                      \
        }                                                                                          \
        for (int r = 0; r < RB; r++)                                                               \
            for (int q = 0; q < NC; q++) _mm512_storeu_ps(Y + (size_t)(b0 + r) * ldy + j0 + 16 * q, acc[r][q]); \
    } while (0)

/* fp32: one input per step; bf16: a pair of inputs per step (32 multiply-adds per instruction) */
#define W_FP32(i, q) _mm512_loadu_ps(Wp + (size_t)(i) * width + 16 * (q))
#define X_FP32(x) _mm512_set1_ps(x)
#define MADD_FP32(acc, x, w) _mm512_fmadd_ps(x, w, acc)
#define TILE_FP32(RB, NC) TILE(RB, NC, K, __m512, W_FP32, X_FP32, MADD_FP32)
#define W_BF16(i, q) ((__m512bh)_mm512_loadu_si512(Wp + ((size_t)(i) * width + 16 * (q)) * 2))
#define X_BF16(x) ((__m512bh)_mm512_set1_epi32((int)(x)))
#define MADD_BF16(acc, x, w) _mm512_dpbf16_ps(acc, x, w)
#define TILE_BF16(RB, NC) TILE(RB, NC, K / 2, __m512bh, W_BF16, X_BF16, MADD_BF16)

/* Panels of PANEL columns (each stored whole, see _panels in Python), in tiles of up to 4 rows by the
 * panel's 64 columns. Every output is one chain of multiply-adds over the inputs in order, whatever the tile. */
#define DISPATCH(TILE_RB_NC)                                                                             \
    for (int j0 = 0; j0 < N; j0 += PANEL) {                                                        \
        const int nc = (N - j0) / 16 < 4 ? (N - j0) / 16 : 4, width = 16 * nc;  /* row stride */   \
        const TW *Wp = W + (size_t)j0 * K;                                                         \
        for (int b0 = 0; b0 < B; b0 += 4) {                                                        \
            const int rb = B - b0 < 4 ? B - b0 : 4;                                                \
            switch (rb * 8 + nc) {                                                                 \
            case 9: TILE_RB_NC(1, 1); break; case 10: TILE_RB_NC(1, 2); break; case 11: TILE_RB_NC(1, 3); break; case 12: TILE_RB_NC(1, 4); break; \
            case 17: TILE_RB_NC(2, 1); break; case 18: TILE_RB_NC(2, 2); break; case 19: TILE_RB_NC(2, 3); break; case 20: TILE_RB_NC(2, 4); break; \
            case 25: TILE_RB_NC(3, 1); break; case 26: TILE_RB_NC(3, 2); break; case 27: TILE_RB_NC(3, 3); break; case 28: TILE_RB_NC(3, 4); break; \
            case 33: TILE_RB_NC(4, 1); break; case 34: TILE_RB_NC(4, 2); break; case 35: TILE_RB_NC(4, 3); break; default: TILE_RB_NC(4, 4); break; \
            }                                                                                      \
        }                                                                                          \
    }

__attribute__((target("avx512f")))
static void matmul_fp32_avx512(int B, int K, const float *X, int ldx, const float *W, int N, float *Y, int ldy, int init) {
    typedef float TW;
    DISPATCH(TILE_FP32)
}

__attribute__((target("avx512f,avx512bf16")))
static void matmul_bf16_avx512(int B, int K, const uint32_t *X, int ldx, const uint16_t *W, int N, float *Y, int ldy, int init) {
    typedef uint16_t TW;
    DISPATCH(TILE_BF16)
}

static void matmul_fp32_plain(int B, int K, const float *X, int ldx, const float *W, int N, float *Y, int ldy, int init) {
    for (int b = 0; b < B; b++) {
        float *y = Y + (size_t)b * ldy;
        if (!init) memset(y, 0, sizeof(float) * (size_t)N);
        for (int j0 = 0; j0 < N; j0 += PANEL) {
            const int width = N - j0 < PANEL ? N - j0 : PANEL;
            const float *Wp = W + (size_t)j0 * K;
            for (int i = 0; i < K; i++) {
                const float xi = X[(size_t)b * ldx + i];
                const float *w = Wp + (size_t)i * width;
                for (int j = 0; j < width; j++) y[j0 + j] += xi * w[j];
            }
        }
    }
}

static uint16_t to_bf16(float f) {                      /* round to nearest even, as PyTorch does */
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

__attribute__((target("avx512f,avx512bf16,avx512vl")))
static void to_bf16_row_avx512(const float *x, int n, uint16_t *out) {  /* the same rounding as to_bf16 */
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm256_storeu_si256((__m256i *)(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
    for (; i < n; i++) out[i] = to_bf16(x[i]);
}

/* x (n floats) as bfloat16 pairs: the row's bf16 values in order, an odd tail padded with 0 */
static void to_bf16_row(const float *x, int n, uint16_t *out) {
    to_bf16_row_avx512(x, n, out);
    if (n % 2) out[n] = 0;
}

/* Y (+)= X M for the B rows of X (fp32, row stride ldx, K inputs). bf16 weights round X to bf16 pairs first. */
static void matmul(const ctx_t *cx, int part, int B, const float *X, int ldx, const mat_t *m, float *Y, int ldy, int init,
                   int which, int precision) {
    if (precision == BF16) {
        uint32_t *xb = which ? cx->xbf2[part] : cx->xbf[part];
        int kp = m->K / 2;
        for (int b = 0; b < B; b++) to_bf16_row(X + (size_t)b * ldx, m->K, (uint16_t *)(xb + (size_t)b * kp));
        matmul_bf16_avx512(B, m->K, xb, kp, (const uint16_t *)m->w, m->N, Y, ldy, init);
    } else if (cx->avx512) {
        matmul_fp32_avx512(B, m->K, X, ldx, (const float *)m->w, m->N, Y, ldy, init);
    } else {
        matmul_fp32_plain(B, m->K, X, ldx, (const float *)m->w, m->N, Y, ldy, init);
    }
}

/* -- one layer of one part ---------------------------------------------------------------------- */
typedef struct { const float *h, *c; float *hn, *cn; } states_t;  /* a step's old and new state (L x B x H) */

static void part_layer(ctx_t *cx, const job_t *jb, int p, int k, const int64_t *ids, const states_t *st) {
    const part_t *pt = &cx->parts[p];
    const int B = jb->B, H = cx->H, U = pt->units, u0 = pt->units0;
    const float *hk = st->h + (size_t)k * B * H;           /* old state of layer k */
    float *hn = st->hn + (size_t)k * B * H;                /* new state of layer k */
    float *x = cx->xin[p], *g = cx->gates[p];
    const mat_t *rec = &pt->rec[k];
    const int N = rec->N, KX = rec->K;
    /* the layer's input rows, and the gate pre-activations in g (B x N) */
    if (cx->cell == GRU) {
        float *gh = cx->gates2[p];
        const mat_t *in = &pt->inp[k];
        for (int b = 0; b < B; b++) {                       /* [h, 1] */
            float *xr = x + (size_t)b * KX;
            memcpy(xr, hk + (size_t)b * H, sizeof(float) * H);
            xr[H] = 1.0f;
            for (int i = H + 1; i < KX; i++) xr[i] = 0.0f;
        }
        matmul(cx, p, B, x, KX, rec, gh, N, 0, 0, cx->precision);
        if (k == 0) {
            for (int b = 0; b < B; b++) memcpy(g + (size_t)b * N, pt->table + (size_t)ids[b] * N, sizeof(float) * N);
        } else {
            const int KI = in->K;
            float *xi = cx->xin[p] + (size_t)B * KX;
            for (int b = 0; b < B; b++) {
                float *xr = xi + (size_t)b * KI;
                memcpy(xr, st->hn + (size_t)(k - 1) * B * H + (size_t)b * H, sizeof(float) * H);
                xr[H] = 1.0f;
                for (int i = H + 1; i < KI; i++) xr[i] = 0.0f;
            }
            matmul(cx, p, B, xi, KI, in, g, N, 0, 1, cx->precision);
        }
        for (int b = 0; b < B; b++) {
            float *gr = g + (size_t)b * N, *ghr = gh + (size_t)b * N;
            const float *hold = hk + (size_t)b * H + u0;
            float *hnew = hn + (size_t)b * H + u0;
            for (int j = 0; j < 2 * U; j++) gr[j] += ghr[j];
            tanh_n(cx, gr, 2 * U);
            for (int j = 0; j < 2 * U; j++) gr[j] = gr[j] * 0.5f + 0.5f;
            float *n = gr + 2 * U;
            for (int j = 0; j < U; j++) n[j] = gr[j] * ghr[2 * U + j] + n[j];
            tanh_n(cx, n, U);
            for (int j = 0; j < U; j++) {
                float d = hold[j] - n[j];
                d = gr[U + j] * d;
                hnew[j] = d + n[j];
            }
        }
        return;
    }
    if (k == 0) {
        for (int b = 0; b < B; b++) {
            memcpy(g + (size_t)b * N, pt->table + (size_t)ids[b] * N, sizeof(float) * N);
            float *xr = x + (size_t)b * KX;
            memcpy(xr, hk + (size_t)b * H, sizeof(float) * H);
            for (int i = H; i < KX; i++) xr[i] = 0.0f;
        }
        matmul(cx, p, B, x, KX, rec, g, N, 1, 0, cx->precision);
    } else {
        for (int b = 0; b < B; b++) {                       /* [x, h, 1] */
            float *xr = x + (size_t)b * KX;
            memcpy(xr, st->hn + (size_t)(k - 1) * B * H + (size_t)b * H, sizeof(float) * H);
            memcpy(xr + H, hk + (size_t)b * H, sizeof(float) * H);
            xr[2 * H] = 1.0f;
            for (int i = 2 * H + 1; i < KX; i++) xr[i] = 0.0f;
        }
        matmul(cx, p, B, x, KX, rec, g, N, 0, 0, cx->precision);
    }
    for (int b = 0; b < B; b++) {
        float *gr = g + (size_t)b * N;
        float *hnew = hn + (size_t)b * H + u0;
        if (cx->cell == RNN) {
            if (cx->relu) for (int j = 0; j < U; j++) hnew[j] = gr[j] > 0.0f ? gr[j] : 0.0f;
            else { tanh_n(cx, gr, U); memcpy(hnew, gr, sizeof(float) * U); }
            continue;
        }
        const float *cold = st->c + (size_t)k * B * H + (size_t)b * H + u0;
        float *cnew = st->cn + (size_t)k * B * H + (size_t)b * H + u0;
        tanh_n(cx, gr, 4 * U);
        for (int j = 0; j < 3 * U; j++) gr[j] = gr[j] * 0.5f + 0.5f;  /* sigmoid(x) = (1 + tanh(x / 2)) / 2 */
        float *i_ = gr, *f_ = gr + U, *o_ = gr + 2 * U, *g_ = gr + 3 * U;
        for (int j = 0; j < U; j++) cnew[j] = f_[j] * cold[j] + i_[j] * g_[j];
        memcpy(o_ + U, cnew, sizeof(float) * U);             /* tanh(c) in the g slot, already used */
        tanh_n(cx, o_ + U, U);
        for (int j = 0; j < U; j++) hnew[j] = o_[j] * o_[U + j];
    }
}

/* -- threads: the caller runs part 0 (and every part when alone), one worker runs part 1 ------- */
static void barrier(ctx_t *cx) {
    if (cx->workers < 2) return;
    int gen = atomic_load_explicit(&cx->bar_gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&cx->bar_count, 1, memory_order_acq_rel) == 1) {
        atomic_store_explicit(&cx->bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&cx->bar_gen, 1, memory_order_release);
        return;
    }
    for (long spins = 0; atomic_load_explicit(&cx->bar_gen, memory_order_acquire) == gen; spins++) {
        if (spins > 2000) sched_yield(); else _mm_pause();
    }
}

static int choose_all(ctx_t *cx, job_t *jb, int t, const float *logits, int64_t *ids, double *lps);

/* One step of every row: every layer, each part on its thread, a barrier after each layer. */
static void step_parts(ctx_t *cx, job_t *jb, int self, const int64_t *ids, const states_t *st) {
    for (int k = 0; k < cx->L; k++) {
        if (cx->workers < 2) {
            for (int p = 0; p < NPARTS; p++) part_layer(cx, jb, p, k, ids, st);
        } else {
            part_layer(cx, jb, self, k, ids, st);
            barrier(cx);
        }
    }
}

/* logits (B x V) of the top layer of state h; thread self's scratch */
static void output_layer(ctx_t *cx, int B, int self, const float *h, float *logits) {
    const int H = cx->H, V = cx->V, VP = cx->VP;
    float *x = cx->xin[self], *y = cx->gates[self];
    const float *top = h + (size_t)(cx->L - 1) * B * H;
    for (int b = 0; b < B; b++) {
        memcpy(x + (size_t)b * (H + 1), top + (size_t)b * H, sizeof(float) * H);
        x[(size_t)b * (H + 1) + H] = 1.0f;
    }
    mat_t head = { cx->w_out, H + 1, VP };
    matmul(cx, self, B, x, H + 1, &head, y, VP, 0, 0, FP32);  /* the output layer stays fp32 */
    for (int b = 0; b < B; b++) memcpy(logits + (size_t)b * V, y + (size_t)b * VP, sizeof(float) * V);
}

/* The whole call, from one thread's point of view (self 0: the caller, 1: the worker).
 * The state alternates between the caller's arrays and the context's (no copies per step); both
 * threads compute the output layer and the choice themselves (the same arithmetic, so the same
 * characters), which saves a barrier per step; only the caller writes results. */
static void run_job(ctx_t *cx, job_t *jb, int self) {
    const int B = jb->B;
    float *hb[2] = { jb->h, cx->hn }, *cb[2] = { jb->c, cx->cn };
    int cur = 0;
    float *logits = self == 0 ? jb->logits : cx->logits1;
    if (self) memcpy(logits, jb->logits, sizeof(float) * (size_t)B * cx->V);
    if (cx->step_only) {
        states_t st = { hb[0], cb[0], hb[1], cb[1] };
        step_parts(cx, jb, self, jb->first_ids, &st);
        cur = 1;
    } else {
        for (int t = 0; t < jb->T; t++) {
            int64_t *ids = self == 0 ? jb->ids_out + (size_t)t * B : cx->ids1;
            if (choose_all(cx, jb, t, logits, ids, self == 0 ? jb->lp_out : NULL) != 0) {
                if (self == 0) jb->error = 1;
                break;
            }
            if (t + 1 == jb->T && !jb->step_last) break;
            states_t st = { hb[cur], cb[cur], hb[1 - cur], cb[1 - cur] };
            step_parts(cx, jb, self, ids, &st);
            cur = 1 - cur;
            if (cx->workers > 1 || self == 0) output_layer(cx, B, self, hb[cur], logits);
        }
    }
    if (self == 0) {
        if (cx->step_only) output_layer(cx, B, 0, hb[cur], logits);
        if (cur == 1) {                                      /* the final state into the caller's arrays */
            size_t n = (size_t)cx->L * B * cx->H;
            memcpy(jb->h, cx->hn, sizeof(float) * n);
            if (cx->cell == LSTM) memcpy(jb->c, cx->cn, sizeof(float) * n);
        }
    }
}

static void *worker_main(void *arg) {
    ctx_t *cx = (ctx_t *)arg;
    int seen = 0;
    for (;;) {
        long spins = 0;
        while (atomic_load_explicit(&cx->job_seq, memory_order_acquire) == seen && !atomic_load(&cx->quit)) {
            if (++spins < 200000) { _mm_pause(); continue; }      /* ~ a few ms of spinning, then sleep */
            pthread_mutex_lock(&cx->sleep_lock);
            atomic_store(&cx->sleeping, 1);
            while (atomic_load(&cx->job_seq) == seen && !atomic_load(&cx->quit))
                pthread_cond_wait(&cx->wake, &cx->sleep_lock);
            atomic_store(&cx->sleeping, 0);
            pthread_mutex_unlock(&cx->sleep_lock);
        }
        if (atomic_load(&cx->quit)) return NULL;
        seen = atomic_load(&cx->job_seq);
        run_job(cx, cx->job, 1);
        atomic_store_explicit(&cx->done_seq, seen, memory_order_release);
    }
}

static void run(ctx_t *cx, job_t *jb) {
    cx->job = jb;
    if (cx->workers > 1) {
        int seq = atomic_load(&cx->job_seq) + 1;
        pthread_mutex_lock(&cx->sleep_lock);
        atomic_store_explicit(&cx->job_seq, seq, memory_order_release);
        if (atomic_load(&cx->sleeping)) pthread_cond_signal(&cx->wake);
        pthread_mutex_unlock(&cx->sleep_lock);
        run_job(cx, jb, 0);
        for (long spins = 0; atomic_load_explicit(&cx->done_seq, memory_order_acquire) != seq; spins++)
            if (spins > 2000) sched_yield(); else _mm_pause();
    } else {
        run_job(cx, jb, 0);
    }
}

/* -- choosing characters (the arithmetic of charnn.sampling.Chooser) --------------------------- */
static int cmp_desc(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

__attribute__((target("avx512f")))
static void exp_shift_avx512(float *z, int n, float m) {   /* z = exp(z - m), z <= m */
    const __m512 mv = _mm512_set1_ps(m);
    for (int i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(z + i, k, exp_neg512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, z + i), mv)));
    }
}

static int choose_row(const ctx_t *cx, const job_t *jb, const float *logits, int V, double u, float *z, float *tmp,
                      int *order) {
    int lo = jb->ban_unknown ? 1 : 0;
    if (jb->greedy) {
        int best = lo;
        for (int i = lo + 1; i < V; i++) if (logits[i] > logits[best]) best = i;
        return best;
    }
    memcpy(z, logits, sizeof(float) * V);
    if (jb->ban_unknown) z[0] = -INFINITY;
    if (jb->inv_temp != 1.0f) for (int i = 0; i < V; i++) z[i] = z[i] * jb->inv_temp;
    if (jb->top_k > 0 && jb->top_k < V) {
        memcpy(tmp, z, sizeof(float) * V);
        qsort(tmp, V, sizeof(float), cmp_desc);
        float kth = tmp[jb->top_k - 1];
        for (int i = 0; i < V; i++) if (z[i] < kth) z[i] = -INFINITY;
    }
    float m = z[0];
    for (int i = 1; i < V; i++) if (z[i] > m) m = z[i];
    if (cx->avx512) exp_shift_avx512(z, V, m);
    else for (int i = 0; i < V; i++) z[i] = expf(z[i] - m);
    if (jb->top_p < 1.0) {
        double total = 0;
        for (int i = 0; i < V; i++) total += z[i];
        for (int i = 0; i < V; i++) order[i] = i;
        for (int i = 1; i < V; i++) {                       /* stable insertion sort by falling probability */
            int o = order[i], j = i;
            while (j > 0 && z[order[j - 1]] < z[o]) { order[j] = order[j - 1]; j--; }
            order[j] = o;
        }
        double before = 0;
        for (int r = 0; r < V; r++) {
            double q = z[order[r]] / total;
            if (before >= jb->top_p) z[order[r]] = 0.0f;
            before += q;
        }
    }
    double cdf = 0, target;
    double total = 0;
    for (int i = 0; i < V; i++) total += z[i];
    if (!(total > 0)) return -1;
    target = u * total;
    int id = 0, last = -1;
    for (int i = 0; i < V; i++) {
        cdf += z[i];
        if (z[i] > 0) last = i;
        if (cdf <= target) id = i + 1;
    }
    if (id >= V) id = last;
    return id;
}

static int choose_all(ctx_t *cx, job_t *jb, int t, const float *logits, int64_t *ids, double *lps) {
    const int B = jb->B, V = cx->V;
    float z[MAXV + 16], tmp[MAXV];
    int order[MAXV];
    for (int b = 0; b < B; b++) {
        const float *lg = logits + (size_t)b * V;
        double u = jb->uniforms ? jb->uniforms[(size_t)t * B + b] : 0.0;
        int id = choose_row(cx, jb, lg, V, u, z, tmp, order);
        if (id < 0) return -1;
        ids[b] = id;
        if (lps) {                                          /* log-probability under the raw model */
            double mx = lg[0], s = 0;
            for (int i = 1; i < V; i++) if (lg[i] > mx) mx = lg[i];
            for (int i = 0; i < V; i++) s += exp((double)lg[i] - mx);
            lps[(size_t)t * B + b] = (double)lg[id] - (mx + log(s));
        }
    }
    return 0;
}

/* -- the interface ------------------------------------------------------------------------------ */
int cn_cpu_features(void) {
    __builtin_cpu_init();
    int f = 0;
    if (__builtin_cpu_supports("avx512f")) f |= 1;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16")) f |= 2;
    return f;
}

/* dims: cell, relu, layers, hidden, vocab, padded vocab, precision, threads, max_rows */
ctx_t *cn_create(const int *dims) {
    ctx_t *cx = calloc(1, sizeof(ctx_t));
    if (!cx) return NULL;
    cx->cell = dims[0]; cx->relu = dims[1]; cx->L = dims[2]; cx->H = dims[3]; cx->V = dims[4]; cx->VP = dims[5];
    cx->precision = dims[6]; cx->workers = dims[7] > 1 ? 2 : 1; cx->max_rows = dims[8];
    int f = cn_cpu_features();
    cx->avx512 = f & 1; cx->bf16ok = (f & 2) != 0;
    if (cx->L > MAXL || cx->V > MAXV || (cx->precision == BF16 && !cx->bf16ok)) { free(cx); return NULL; }
    size_t R = (size_t)cx->max_rows, H = cx->H, G = cx->cell == LSTM ? 4 : cx->cell == GRU ? 3 : 1;
    size_t kx = 2 * H + 2, ng = G * H + 64 + (size_t)cx->VP;
    for (int p = 0; p < NPARTS; p++) {
        cx->xin[p] = malloc(sizeof(float) * R * kx * 2);
        cx->gates[p] = malloc(sizeof(float) * R * ng);
        cx->gates2[p] = malloc(sizeof(float) * R * ng);
        cx->xbf[p] = malloc(sizeof(uint32_t) * R * kx);
        cx->xbf2[p] = malloc(sizeof(uint32_t) * R * kx);
    }
    cx->hn = malloc(sizeof(float) * R * H * cx->L);
    cx->cn = malloc(sizeof(float) * R * H * cx->L);
    cx->logits1 = malloc(sizeof(float) * R * cx->V);
    cx->ids1 = malloc(sizeof(int64_t) * R);
    pthread_mutex_init(&cx->call_lock, NULL);
    pthread_mutex_init(&cx->sleep_lock, NULL);
    pthread_cond_init(&cx->wake, NULL);
    if (cx->workers > 1 && pthread_create(&cx->thread, NULL, worker_main, cx) != 0) cx->workers = 1;
    return cx;
}

/* part p: its units, table, and per layer the matrices (rec, then inp for a GRU) */
void cn_set_part(ctx_t *cx, int p, int units0, int units, const float *table, const void **mats, const int *shapes) {
    part_t *pt = &cx->parts[p];
    pt->units0 = units0; pt->units = units; pt->table = table;
    for (int k = 0; k < cx->L; k++) {
        pt->rec[k] = (mat_t){ mats[2 * k], shapes[4 * k], shapes[4 * k + 1] };
        pt->inp[k] = (mat_t){ mats[2 * k + 1], shapes[4 * k + 2], shapes[4 * k + 3] };
    }
}

void cn_set_head(ctx_t *cx, const float *w_out) { cx->w_out = w_out; }

void cn_destroy(ctx_t *cx) {
    if (!cx) return;
    if (cx->workers > 1) {
        pthread_mutex_lock(&cx->sleep_lock);
        atomic_store(&cx->quit, 1);
        pthread_cond_signal(&cx->wake);
        pthread_mutex_unlock(&cx->sleep_lock);
        pthread_join(cx->thread, NULL);
    }
    for (int p = 0; p < NPARTS; p++) { free(cx->xin[p]); free(cx->gates[p]); free(cx->gates2[p]); free(cx->xbf[p]); free(cx->xbf2[p]); }
    free(cx->hn); free(cx->cn); free(cx->logits1); free(cx->ids1);
    free(cx);
}

/* One step of B rows: ids (B), state h/c (L x B x H) updated in place, logits (B x V) written. */
int cn_step(ctx_t *cx, int B, const int64_t *ids, float *h, float *c, float *logits) {
    if (B < 1 || B > cx->max_rows) return -2;
    job_t jb = { .B = B, .T = 1, .first_ids = ids, .h = h, .c = c, .logits = logits };
    pthread_mutex_lock(&cx->call_lock);
    cx->step_only = 1;
    run(cx, &jb);
    pthread_mutex_unlock(&cx->call_lock);
    return 0;
}

/* T characters for each of B rows from the current logits; state and logits advance in place.
 * opts: inv_temp, top_k, top_p, ban_unknown, greedy (as doubles). Returns 0, or -1 on invalid scores. */
int cn_generate(ctx_t *cx, int B, int T, float *h, float *c, float *logits, const double *uniforms,
                const double *opts, int64_t *ids_out, double *lp_out, int step_last) {
    if (B < 1 || B > cx->max_rows || T < 1) return -2;
    job_t jb = { .B = B, .T = T, .step_last = step_last, .h = h, .c = c, .logits = logits, .uniforms = uniforms,
                 .ids_out = ids_out, .lp_out = lp_out, .inv_temp = (float)opts[0], .top_k = (int)opts[1],
                 .top_p = opts[2], .ban_unknown = (int)opts[3], .greedy = (int)opts[4] };
    pthread_mutex_lock(&cx->call_lock);
    cx->step_only = 0;
    run(cx, &jb);
    pthread_mutex_unlock(&cx->call_lock);
    return jb.error ? -1 : 0;
}
