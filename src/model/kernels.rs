//! Fast CPU matrix products for GGUF weights stored as Q4_1, Q4_0 or Q8_0.
//!
//! candle 0.11 multiplies Q4_1 weights with a scalar per-block loop, and its Q8_0 tiles need `k` to
//! be a multiple of 256. [`FastQMatMul`] regroups a weight matrix once, at load time, into tiles
//! of 16 output rows by one 32-value block, laid out so that a single vector instruction forms
//! 4-value partial dot products for all 16 rows at once: tile word `j` of row `r` holds that row's
//! quants `4j..4j+4` (for the 4-bit formats the high nibbles of the same bytes hold `16+4j..`).
//!
//! Activations are quantized per 32-value block exactly as candle's `BlockQ8_1::from_float` /
//! `BlockQ8_0::from_float` do (`d = amax / 127`, `q = round(x / d)`, Q8_1's `s = d · Σq` rounded
//! through f16), so the integer block dot products equal candle's (and llama.cpp's). The float
//! operations that scale and accumulate them are also candle's, in candle's order, so the results
//! are bit-identical to candle's CPU path on x86-64:
//! - Q4_1 (candle's scalar loop): `acc += (Σ·d_w)·d_x + m_w·s_x` per block;
//! - Q4_0, Q8_0 (candle's AVX2 `vec_dot`): eight partial sums per row, one per 4-value word,
//!   `acc_j = fma(d_w·d_x, Σ_j, acc_j)` per block, added up at the end as candle's `hsum_float_8`.
//!
//! This matters more than it seems: these models amplify rounding differences in the projections
//! (1e-6 relative per matmul moves final logits by ~0.5), enough to flip near-tied greedy tokens.
//!
//! Three implementations give identical results: a portable scalar one, AVX2
//! (`maddubs`/`madd`) and AVX-512 VNNI (`vpdpbusd`). The widest one compiled in (the crate builds
//! with `-C target-cpu=native`) is used.
//!
//! A matmul quantizes its input rows once into a reused thread-local buffer, then splits the work
//! — (16-row weight group, chunk of activation rows) pairs, group-major so a worker keeps one
//! weight group hot in L1 while it walks activation rows a few at a time — over candle's CPU
//! worker pool (see [`par_for`]).

// The kernels walk several parallel arrays (rows, words, lanes) by index; iterators over one of
// them would only obscure that.
#![allow(clippy::needless_range_loop)]

use std::cell::RefCell;
use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Storage, Tensor};

/// Output rows per weight tile.
const TILE: usize = 16;
/// Values per quantization block (all formats here).
const QK: usize = 32;
/// How far ahead (in tiles) the single-row kernel prefetches weights.
const PREFETCH_TILES: usize = 6;
/// Activation rows per work item when the input has several rows (a multiple of every
/// `Format::ROWS`).
const ROW_CHUNK: usize = 60;

// ---------------------------------------------------------------------------------------------
// f16 conversions (software, exact; the SIMD kernels use the F16C instructions instead).

/// Widens IEEE binary16 bits to f32 (exact).
fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0f32 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as u32;
    let man = (h & 0x3ff) as u32;
    match exp {
        // zero or subnormal: man · 2^-24, exact in f32
        0 => sign * (man as f32 * (1.0 / 16_777_216.0)),
        31 => f32::from_bits(((h as u32 & 0x8000) << 16) | 0x7f80_0000 | (man << 13)),
        _ => f32::from_bits(((h as u32 & 0x8000) << 16) | ((exp + 112) << 23) | (man << 13)),
    }
}

/// Rounds an f32 to the nearest IEEE binary16 (ties to even), as `half::f16::from_f32` does.
fn f32_to_f16(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x7f_ffff;
    if exp == 0xff {
        let nan = if man != 0 { 0x200 | (man >> 13) as u16 } else { 0 };
        return sign | 0x7c00 | nan;
    }
    let e = exp - 127 + 15;
    if e >= 31 {
        return sign | 0x7c00;
    }
    // Rounds `v >> shift` to nearest, ties to even.
    let round = |v: u32, shift: u32| -> u32 {
        let q = v >> shift;
        let rem = v & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        if rem > half || (rem == half && q & 1 == 1) {
            q + 1
        } else {
            q
        }
    };
    if e <= 0 {
        // f16 subnormal (or zero): the value in units of 2^-24 is (1.man) · 2^(e - 14 + 24).
        if e < -10 {
            return sign;
        }
        return sign | round(man | 0x80_0000, (14 - e) as u32) as u16;
    }
    // A carry out of the mantissa correctly bumps the exponent (up to infinity).
    sign | round(((e as u32) << 23) | man, 13) as u16
}

/// `x` rounded to the nearest f16 value (ties to even), as an f32.
#[inline]
fn round_f16(x: f32) -> f32 {
    #[cfg(all(target_arch = "x86_64", target_feature = "f16c"))]
    {
        #[target_feature(enable = "f16c")]
        fn f16c(x: f32) -> f32 {
            use std::arch::x86_64::*;
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(x))))
        }
        // SAFETY: compiled only when the build targets F16C.
        unsafe { f16c(x) }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "f16c")))]
    {
        f16_to_f32(f32_to_f16(x))
    }
}

// ---------------------------------------------------------------------------------------------
// Activations.

/// One quantized 32-value block of an activation row. The quants are kept as little-endian
/// 4-byte words, the unit the tile kernels broadcast.
#[derive(Clone, Copy, Default, Debug)]
#[repr(C, align(16))]
struct ActBlock {
    /// q[4j..4j+4] as one little-endian word.
    qw: [i32; 8],
    /// Σ q[4j..4j+4] per word (for the zero-point correction of Q4_0/Q8_0 partial sums).
    ws: [i32; 8],
    /// Scale, rounded through f16 as stored in a Q8_1/Q8_0 block.
    d: f32,
    /// Q8_1's `s = d · Σq`, rounded through f16 as candle computes it.
    s: f32,
    /// Σq, exact.
    isum: i32,
    _pad: i32,
}

impl ActBlock {
    fn q(&self, i: usize) -> i8 {
        self.qw[i / 4].to_le_bytes()[i % 4] as i8
    }

    /// Sets the scales from `d = amax / 127` (unrounded) and the per-word quant sums.
    fn set_scales(&mut self, d: f32, ws: [i32; 8]) {
        let isum = ws.iter().sum::<i32>();
        self.d = round_f16(d);
        // candle: `f16::from_f32(sum as f32) * d16`, an f16 product (computed in f32, rounded).
        self.s = round_f16(round_f16(isum as f32) * self.d);
        self.ws = ws;
        self.isum = isum;
    }
}

/// Quantizes one block like candle's `BlockQ8_1::from_float` / `BlockQ8_0::from_float`.
fn quantize_block_scalar(x: &[f32; QK], out: &mut ActBlock) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut ws = [0i32; 8];
    for (j, xs) in x.chunks_exact(4).enumerate() {
        let q: [i8; 4] = std::array::from_fn(|i| (xs[i] * id).round() as i8);
        ws[j] = q.iter().map(|&v| v as i32).sum();
        out.qw[j] = i32::from_le_bytes(q.map(|v| v as u8));
    }
    out.set_scales(d, ws);
}

fn quantize_row(path: KernelPath, x: &[f32], out: &mut [ActBlock]) {
    let (blocks, _) = x.as_chunks::<QK>();
    debug_assert_eq!(blocks.len(), out.len());
    match path {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw", target_feature = "avx512vnni"))]
        KernelPath::Avx512Vnni => {
            for (x, o) in blocks.iter().zip(out) {
                // SAFETY: compiled only when the build targets AVX-512 (see `tile_with`).
                unsafe { avx512::quantize_block(x, o) };
            }
        }
        _ => {
            for (x, o) in blocks.iter().zip(out) {
                quantize_block_scalar(x, o);
            }
        }
    }
}

/// Quantizes `x` (a multiple of 32 values) to Q8_1 blocks in GGUF's byte layout (f16 d, f16 s,
/// 32 × i8), with the given implementation; for comparing against candle's quantizer.
#[doc(hidden)]
pub fn quantize_q8_1_bytes(x: &[f32], path: KernelPath) -> Vec<u8> {
    assert!(x.len().is_multiple_of(QK), "length {} is not a multiple of {QK}", x.len());
    let mut blocks = vec![ActBlock::default(); x.len() / QK];
    quantize_row(path, x, &mut blocks);
    let mut out = Vec::with_capacity(blocks.len() * 36);
    for b in &blocks {
        out.extend_from_slice(&f32_to_f16(b.d).to_le_bytes());
        out.extend_from_slice(&f32_to_f16(b.s).to_le_bytes());
        for w in b.qw {
            out.extend_from_slice(&w.to_le_bytes());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Weight formats and tiles.

/// 16 rows × one block of Q4_1: nibble bytes regrouped by 4-byte word (see the module docs).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct TileQ4_1 {
    d: [u16; TILE],
    m: [u16; TILE],
    qs: [[u8; 4 * TILE]; 4],
}

#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct TileQ4_0 {
    d: [u16; TILE],
    qs: [[u8; 4 * TILE]; 4],
}

/// Q8_0 quants are stored offset by 128 (`q ^ 0x80`) so that they are unsigned like the others.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct TileQ8_0 {
    d: [u16; TILE],
    qs: [[u8; 4 * TILE]; 8],
}

/// A supported weight encoding. `u(t, r, i)` is the stored unsigned quant of value `i` of row `r`;
/// the weight is `d · (u - ZERO)` (+ `m` when `HAS_MIN`).
trait Format: Send + Sync + 'static {
    type Tile: Copy + Send + Sync;
    const DTYPE: GgmlDType;
    const BLOCK_BYTES: usize;
    const ZERO: i32;
    const HAS_MIN: bool;
    /// 4-bit quants: word `j`'s low nibbles are quants `4j..4j+4`, its high nibbles `16+4j..`.
    const NIBBLES: bool;
    /// Accumulate as candle's AVX2 `vec_dot` (eight per-word partial sums per row) rather than
    /// candle's scalar loop (one sum per row); see the module docs.
    const LANES: bool;
    /// Activation rows one tile-kernel call handles together (each weight tile is unpacked once
    /// per call and reused for all of them; bounded by the registers the accumulators need).
    const ROWS: usize;
    fn zero_tile() -> Self::Tile;
    /// The tile's quant words (4 for the 4-bit formats, 8 for Q8_0).
    fn qs(t: &Self::Tile) -> &[[u8; 4 * TILE]];
    /// Stores row `r`'s GGUF block `src` into the tile.
    fn pack(t: &mut Self::Tile, r: usize, src: &[u8]);
    fn d(t: &Self::Tile) -> &[u16; TILE];
    /// The per-row minimum (only read when `HAS_MIN`).
    fn m(t: &Self::Tile) -> &[u16; TILE];
    fn u(t: &Self::Tile, r: usize, i: usize) -> u8;
}

fn f16_at(src: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([src[at], src[at + 1]])
}

/// Regroups 16 bytes of nibbles (`q[i] | q[i+16] << 4`) into the tile's word layout.
fn pack_nibbles(qs: &mut [[u8; 4 * TILE]; 4], r: usize, src: &[u8]) {
    for (j, word) in qs.iter_mut().enumerate() {
        word[4 * r..4 * r + 4].copy_from_slice(&src[4 * j..4 * j + 4]);
    }
}

fn nibble(qs: &[[u8; 4 * TILE]; 4], r: usize, i: usize) -> u8 {
    let byte = qs[(i % 16) / 4][4 * r + i % 4];
    if i < 16 {
        byte & 0x0f
    } else {
        byte >> 4
    }
}

struct Q4_1;
struct Q4_0;
struct Q8_0;

impl Format for Q4_1 {
    type Tile = TileQ4_1;
    const DTYPE: GgmlDType = GgmlDType::Q4_1;
    const BLOCK_BYTES: usize = 20;
    const ZERO: i32 = 0;
    const HAS_MIN: bool = true;
    const NIBBLES: bool = true;
    const LANES: bool = false;
    const ROWS: usize = 6;
    fn qs(t: &TileQ4_1) -> &[[u8; 4 * TILE]] {
        &t.qs
    }
    fn zero_tile() -> TileQ4_1 {
        TileQ4_1 { d: [0; TILE], m: [0; TILE], qs: [[0; 4 * TILE]; 4] }
    }
    fn pack(t: &mut TileQ4_1, r: usize, src: &[u8]) {
        t.d[r] = f16_at(src, 0);
        t.m[r] = f16_at(src, 2);
        pack_nibbles(&mut t.qs, r, &src[4..20]);
    }
    fn d(t: &TileQ4_1) -> &[u16; TILE] {
        &t.d
    }
    fn m(t: &TileQ4_1) -> &[u16; TILE] {
        &t.m
    }
    fn u(t: &TileQ4_1, r: usize, i: usize) -> u8 {
        nibble(&t.qs, r, i)
    }
}

impl Format for Q4_0 {
    type Tile = TileQ4_0;
    const DTYPE: GgmlDType = GgmlDType::Q4_0;
    const BLOCK_BYTES: usize = 18;
    const ZERO: i32 = 8;
    const HAS_MIN: bool = false;
    const NIBBLES: bool = true;
    const LANES: bool = true;
    const ROWS: usize = 2;
    fn qs(t: &TileQ4_0) -> &[[u8; 4 * TILE]] {
        &t.qs
    }
    fn zero_tile() -> TileQ4_0 {
        TileQ4_0 { d: [0; TILE], qs: [[0; 4 * TILE]; 4] }
    }
    fn pack(t: &mut TileQ4_0, r: usize, src: &[u8]) {
        t.d[r] = f16_at(src, 0);
        pack_nibbles(&mut t.qs, r, &src[2..18]);
    }
    fn d(t: &TileQ4_0) -> &[u16; TILE] {
        &t.d
    }
    fn m(t: &TileQ4_0) -> &[u16; TILE] {
        &t.d
    }
    fn u(t: &TileQ4_0, r: usize, i: usize) -> u8 {
        nibble(&t.qs, r, i)
    }
}

impl Format for Q8_0 {
    type Tile = TileQ8_0;
    const DTYPE: GgmlDType = GgmlDType::Q8_0;
    const BLOCK_BYTES: usize = 34;
    const ZERO: i32 = 128;
    const HAS_MIN: bool = false;
    const NIBBLES: bool = false;
    const LANES: bool = true;
    const ROWS: usize = 2;
    fn qs(t: &TileQ8_0) -> &[[u8; 4 * TILE]] {
        &t.qs
    }
    fn zero_tile() -> TileQ8_0 {
        TileQ8_0 { d: [0; TILE], qs: [[0x80; 4 * TILE]; 8] }
    }
    fn pack(t: &mut TileQ8_0, r: usize, src: &[u8]) {
        t.d[r] = f16_at(src, 0);
        for (j, word) in t.qs.iter_mut().enumerate() {
            for i in 0..4 {
                word[4 * r + i] = src[2 + 4 * j + i] ^ 0x80;
            }
        }
    }
    fn d(t: &TileQ8_0) -> &[u16; TILE] {
        &t.d
    }
    fn m(t: &TileQ8_0) -> &[u16; TILE] {
        &t.d
    }
    fn u(t: &TileQ8_0, r: usize, i: usize) -> u8 {
        t.qs[i / 4][4 * r + i % 4]
    }
}

/// Repacks `n_out` rows of `nb` GGUF blocks into `ceil(n_out / 16) · nb` tiles, group-major;
/// rows past `n_out` are zero (scale 0).
fn repack<F: Format>(data: &[u8], n_out: usize, nb: usize) -> Vec<F::Tile> {
    let groups = n_out.div_ceil(TILE);
    let mut tiles = vec![F::zero_tile(); groups * nb];
    for (g, group) in tiles.chunks_exact_mut(nb).enumerate() {
        for r in 0..TILE.min(n_out - g * TILE) {
            let row = &data[(g * TILE + r) * nb * F::BLOCK_BYTES..][..nb * F::BLOCK_BYTES];
            for (tile, src) in group.iter_mut().zip(row.chunks_exact(F::BLOCK_BYTES)) {
                F::pack(tile, r, src);
            }
        }
    }
    tiles
}

// ---------------------------------------------------------------------------------------------
// Tile kernels: 16 weight rows × R activation rows over all k-blocks.

/// The tile-kernel implementations compiled into this build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl KernelPath {
    /// Every implementation this build (and so this CPU) can run, portable first.
    pub fn available() -> Vec<KernelPath> {
        let mut paths = vec![KernelPath::Scalar];
        if cfg!(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c")) {
            paths.push(KernelPath::Avx2);
        }
        if cfg!(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw", target_feature = "avx512vnni")) {
            paths.push(KernelPath::Avx512Vnni);
        }
        paths
    }

    /// The fastest available implementation.
    pub fn best() -> KernelPath {
        *Self::available().last().expect("scalar is always available")
    }
}

mod scalar {
    use super::*;

    /// Σ (u - ZERO)·q over word `j` (quants 4j..4j+4) of one tile row.
    fn word_dot<F: Format>(t: &F::Tile, row: usize, a: &ActBlock, j: usize) -> i32 {
        let s: i32 = (4 * j..4 * j + 4).map(|i| F::u(t, row, i) as i32 * a.q(i) as i32).sum();
        s - F::ZERO * a.ws[j]
    }

    /// Candle's scalar-loop order: one sum per row.
    pub(super) fn tile<F: Format, const R: usize>(w: &[F::Tile], acts: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
        let mut acc = [[0f32; TILE]; R];
        for (b, t) in w.iter().enumerate() {
            for (r, act) in acts.iter().enumerate() {
                let a = &act[b];
                for row in 0..TILE {
                    let s: i32 = (0..8).map(|j| word_dot::<F>(t, row, a, j)).sum();
                    let mut v = s as f32 * f16_to_f32(F::d(t)[row]) * a.d;
                    if F::HAS_MIN {
                        v += f16_to_f32(F::m(t)[row]) * a.s;
                    }
                    acc[r][row] += v;
                }
            }
        }
        acc
    }

    /// Candle's AVX2 order: eight per-word sums per row, fused multiply-adds, then `hsum_float_8`.
    pub(super) fn tile_lanes<F: Format, const R: usize>(w: &[F::Tile], acts: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
        let mut acc = [[[0f32; 8]; TILE]; R];
        for (b, t) in w.iter().enumerate() {
            for (r, act) in acts.iter().enumerate() {
                let a = &act[b];
                for row in 0..TILE {
                    let d = f16_to_f32(F::d(t)[row]) * a.d;
                    for j in 0..8 {
                        acc[r][row][j] = (word_dot::<F>(t, row, a, j) as f32).mul_add(d, acc[r][row][j]);
                    }
                }
            }
        }
        acc.map(|rows| rows.map(|l| ((l[4] + l[0]) + (l[6] + l[2])) + ((l[5] + l[1]) + (l[7] + l[3]))))
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    fn load256(bytes: &[u8; 32]) -> __m256i {
        // SAFETY: reads exactly the 32 bytes of the referenced array (unaligned load).
        unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
    }

    #[target_feature(enable = "avx2,f16c")]
    fn load_f16x8(h: &[u16]) -> __m256 {
        let h: &[u16; 8] = h.try_into().expect("8 halves");
        // SAFETY: reads exactly the 16 bytes of the referenced array (unaligned load).
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(h.as_ptr().cast()) })
    }

    #[target_feature(enable = "avx2")]
    fn store_f32x8(dst: &mut [f32], v: __m256) {
        let dst: &mut [f32; 8] = dst.try_into().expect("8 lanes");
        // SAFETY: writes exactly the 8 floats of the referenced array (unaligned store).
        unsafe { _mm256_storeu_ps(dst.as_mut_ptr(), v) }
    }

    /// Half `h` (rows 8h..8h+8) of a 16-row tile word.
    fn half(word: &[u8; 64], h: usize) -> &[u8; 32] {
        word[32 * h..32 * h + 32].try_into().expect("32 bytes")
    }

    /// Half a tile as 8 vectors of bytes, vector `j` holding quants `4j..4j+4` of 8 rows: unsigned
    /// nibbles for the 4-bit formats, signed quants for Q8_0 (`maddubs` of the offset bytes,
    /// up to 255, could saturate).
    #[target_feature(enable = "avx2")]
    fn unpack<F: Format>(t: &F::Tile, h: usize) -> [__m256i; 8] {
        let qs = F::qs(t);
        let mut w = [_mm256_setzero_si256(); 8];
        if F::NIBBLES {
            let mask = _mm256_set1_epi8(0x0f);
            for j in 0..4 {
                let v = load256(half(&qs[j], h));
                w[j] = _mm256_and_si256(v, mask);
                w[j + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), mask);
            }
        } else {
            for j in 0..8 {
                w[j] = _mm256_xor_si256(load256(half(&qs[j], h)), _mm256_set1_epi8(-128));
            }
        }
        w
    }

    /// `maddubs` products of word `j` (pairs of i16), exact: nibble pairs are at most
    /// 2·15·127 = 3810; for Q8_0, Σ |w|·(q·sign w) pairs at most 2·128·127 = 32512.
    #[target_feature(enable = "avx2")]
    fn word_pairs<F: Format>(w: &[__m256i; 8], a: &ActBlock, j: usize) -> __m256i {
        let q = _mm256_set1_epi32(a.qw[j]);
        if F::NIBBLES {
            _mm256_maddubs_epi16(w[j], q)
        } else {
            _mm256_maddubs_epi16(_mm256_abs_epi8(w[j]), _mm256_sign_epi8(q, w[j]))
        }
    }

    /// Exact Σ (w - zero)·q over word `j`, per row (8 lanes).
    #[target_feature(enable = "avx2")]
    fn word_dot<F: Format>(w: &[__m256i; 8], a: &ActBlock, j: usize) -> __m256i {
        let s = _mm256_madd_epi16(word_pairs::<F>(w, a, j), _mm256_set1_epi16(1));
        if F::NIBBLES && F::ZERO != 0 {
            _mm256_sub_epi32(s, _mm256_set1_epi32(F::ZERO * a.ws[j]))
        } else {
            s
        }
    }

    /// Exact Σ (w - zero)·q over the block, per row (8 lanes).
    #[target_feature(enable = "avx2")]
    fn block_dot<F: Format>(w: &[__m256i; 8], a: &ActBlock) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        let s = if F::NIBBLES {
            // The eight nibble pair sums fit one i16 sum (8·3810 = 30480) before widening.
            let mut p = word_pairs::<F>(w, a, 0);
            for j in 1..8 {
                p = _mm256_add_epi16(p, word_pairs::<F>(w, a, j));
            }
            _mm256_madd_epi16(p, ones)
        } else {
            let mut s = _mm256_setzero_si256();
            for j in 0..8 {
                s = _mm256_add_epi32(s, _mm256_madd_epi16(word_pairs::<F>(w, a, j), ones));
            }
            s
        };
        if F::NIBBLES && F::ZERO != 0 {
            _mm256_sub_epi32(s, _mm256_set1_epi32(F::ZERO * a.isum))
        } else {
            s
        }
    }

    /// See `scalar::tile`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn tile<F: Format, const R: usize>(w: &[F::Tile], acts: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
        let mut out = [[0f32; TILE]; R];
        for h in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, t) in w.iter().enumerate() {
                let wv = unpack::<F>(t, h);
                let dw = load_f16x8(&F::d(t)[8 * h..8 * h + 8]);
                let mw = if F::HAS_MIN { load_f16x8(&F::m(t)[8 * h..8 * h + 8]) } else { _mm256_setzero_ps() };
                for r in 0..R {
                    let a = &acts[r][b];
                    let s = _mm256_cvtepi32_ps(block_dot::<F>(&wv, a));
                    let mut v = _mm256_mul_ps(_mm256_mul_ps(s, dw), _mm256_set1_ps(a.d));
                    if F::HAS_MIN {
                        v = _mm256_add_ps(v, _mm256_mul_ps(mw, _mm256_set1_ps(a.s)));
                    }
                    acc[r] = _mm256_add_ps(acc[r], v);
                }
            }
            for r in 0..R {
                store_f32x8(&mut out[r][8 * h..8 * h + 8], acc[r]);
            }
        }
        out
    }

    /// See `scalar::tile_lanes`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn tile_lanes<F: Format, const R: usize>(w: &[F::Tile], acts: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
        let mut out = [[0f32; TILE]; R];
        for h in 0..2 {
            let mut acc = [[_mm256_setzero_ps(); 8]; R];
            for (b, t) in w.iter().enumerate() {
                let wv = unpack::<F>(t, h);
                let dw = load_f16x8(&F::d(t)[8 * h..8 * h + 8]);
                for r in 0..R {
                    let a = &acts[r][b];
                    let d = _mm256_mul_ps(dw, _mm256_set1_ps(a.d));
                    for j in 0..8 {
                        let p = _mm256_cvtepi32_ps(word_dot::<F>(&wv, a, j));
                        acc[r][j] = _mm256_fmadd_ps(d, p, acc[r][j]);
                    }
                }
            }
            for r in 0..R {
                let l = &acc[r];
                let lo = _mm256_add_ps(_mm256_add_ps(l[4], l[0]), _mm256_add_ps(l[6], l[2]));
                let hi = _mm256_add_ps(_mm256_add_ps(l[5], l[1]), _mm256_add_ps(l[7], l[3]));
                store_f32x8(&mut out[r][8 * h..8 * h + 8], _mm256_add_ps(lo, hi));
            }
        }
        out
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw", target_feature = "avx512vnni"))]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    fn load512(bytes: &[u8; 64]) -> __m512i {
        // SAFETY: reads exactly the 64 bytes of the referenced array (unaligned load).
        unsafe { _mm512_loadu_si512(bytes.as_ptr().cast()) }
    }

    #[target_feature(enable = "avx512f")]
    fn load_f16x16(h: &[u16; 16]) -> __m512 {
        // SAFETY: reads exactly the 32 bytes of the referenced array (unaligned load).
        _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(h.as_ptr().cast()) })
    }

    #[target_feature(enable = "avx512f")]
    fn load_f32x16(x: &[f32]) -> __m512 {
        let x: &[f32; 16] = x.try_into().expect("16 lanes");
        // SAFETY: reads exactly the 16 floats of the referenced array (unaligned load).
        unsafe { _mm512_loadu_ps(x.as_ptr()) }
    }

    #[target_feature(enable = "avx512f")]
    fn store_f32x16(dst: &mut [f32; 16], v: __m512) {
        // SAFETY: writes exactly the 16 floats of the referenced array (unaligned store).
        unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), v) }
    }

    /// Hints the cache lines of the tile `tiles_ahead` after `t` (possibly past this group, into
    /// the next one, which a worker usually takes next; prefetching never faults).
    #[target_feature(enable = "avx512f")]
    fn prefetch<F: Format>(t: &F::Tile, tiles_ahead: usize) {
        let ahead = (t as *const F::Tile).wrapping_add(tiles_ahead).cast::<i8>();
        for line in (0..size_of::<F::Tile>()).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line));
        }
    }

    /// A tile as 8 vectors of unsigned bytes, vector `j` holding quants `4j..4j+4` of all 16 rows.
    #[target_feature(enable = "avx512f,avx512bw")]
    fn unpack<F: Format>(t: &F::Tile) -> [__m512i; 8] {
        let qs = F::qs(t);
        let mut w = [_mm512_setzero_si512(); 8];
        if F::NIBBLES {
            let mask = _mm512_set1_epi8(0x0f);
            for j in 0..4 {
                let v = load512(&qs[j]);
                w[j] = _mm512_and_si512(v, mask);
                w[j + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), mask);
            }
        } else {
            for j in 0..8 {
                w[j] = load512(&qs[j]);
            }
        }
        w
    }

    /// See `scalar::tile`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) fn tile<F: Format, const R: usize>(w: &[F::Tile], acts: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
        let mut acc = [_mm512_setzero_ps(); R];
        for (b, t) in w.iter().enumerate() {
            if R == 1 {
                // Streaming weights for one activation row: fetch ahead.
                prefetch::<F>(t, PREFETCH_TILES);
            }
            let wv = unpack::<F>(t);
            let dw = load_f16x16(F::d(t));
            let mw = if F::HAS_MIN { load_f16x16(F::m(t)) } else { _mm512_setzero_ps() };
            for r in 0..R {
                let a = &acts[r][b];
                // Two independent dependency chains (quants 0..16 and 16..32).
                let mut lo = _mm512_setzero_si512();
                let mut hi = _mm512_setzero_si512();
                for j in 0..4 {
                    lo = _mm512_dpbusd_epi32(lo, wv[j], _mm512_set1_epi32(a.qw[j]));
                    hi = _mm512_dpbusd_epi32(hi, wv[j + 4], _mm512_set1_epi32(a.qw[j + 4]));
                }
                let mut s = _mm512_add_epi32(lo, hi);
                if F::ZERO != 0 {
                    s = _mm512_sub_epi32(s, _mm512_set1_epi32(F::ZERO * a.isum));
                }
                let s = _mm512_cvtepi32_ps(s);
                let mut v = _mm512_mul_ps(_mm512_mul_ps(s, dw), _mm512_set1_ps(a.d));
                if F::HAS_MIN {
                    v = _mm512_add_ps(v, _mm512_mul_ps(mw, _mm512_set1_ps(a.s)));
                }
                acc[r] = _mm512_add_ps(acc[r], v);
            }
        }
        let mut out = [[0f32; TILE]; R];
        for r in 0..R {
            store_f32x16(&mut out[r], acc[r]);
        }
        out
    }

    /// See `scalar::tile_lanes`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) fn tile_lanes<F: Format, const R: usize>(w: &[F::Tile], acts: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
        let mut acc = [[_mm512_setzero_ps(); 8]; R];
        for (b, t) in w.iter().enumerate() {
            if R == 1 {
                prefetch::<F>(t, PREFETCH_TILES);
            }
            let wv = unpack::<F>(t);
            let dw = load_f16x16(F::d(t));
            for r in 0..R {
                let a = &acts[r][b];
                let d = _mm512_mul_ps(dw, _mm512_set1_ps(a.d));
                for j in 0..8 {
                    // Start from -ZERO·Σq_j so that the sum is of (u - ZERO)·q, exactly.
                    let p = _mm512_dpbusd_epi32(_mm512_set1_epi32(-F::ZERO * a.ws[j]), wv[j], _mm512_set1_epi32(a.qw[j]));
                    acc[r][j] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(p), acc[r][j]);
                }
            }
        }
        let mut out = [[0f32; TILE]; R];
        for r in 0..R {
            let l = &acc[r];
            let lo = _mm512_add_ps(_mm512_add_ps(l[4], l[0]), _mm512_add_ps(l[6], l[2]));
            let hi = _mm512_add_ps(_mm512_add_ps(l[5], l[1]), _mm512_add_ps(l[7], l[3]));
            store_f32x16(&mut out[r], _mm512_add_ps(lo, hi));
        }
        out
    }

    /// Quants of 16 values: `x · id` rounded half away from zero as
    /// `trunc(v + copysign(0.5 - 2^-25, v))`, which is exact for every f32 (the largest float
    /// below 0.5 avoids the spurious round-up that `v + 0.5` has just below a half).
    #[target_feature(enable = "avx512f")]
    fn quant16(x: __m512, id: f32) -> __m512i {
        let v = _mm512_mul_ps(x, _mm512_set1_ps(id));
        let sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN));
        let half_below = _mm512_castps_si512(_mm512_set1_ps(0.5 - 1.0 / 33_554_432.0));
        let bias = _mm512_castsi512_ps(_mm512_or_si512(half_below, sign));
        let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(_mm512_add_ps(v, bias));
        _mm512_cvttps_epi32(r)
    }

    /// `quantize_block_scalar` with the same IEEE operations on 16 lanes at a time.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) fn quantize_block(x: &[f32; QK], out: &mut ActBlock) {
        let (x0, x1) = (load_f32x16(&x[..16]), load_f32x16(&x[16..]));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let bytes = _mm256_set_m128i(_mm512_cvtepi32_epi8(quant16(x1, id)), _mm512_cvtepi32_epi8(quant16(x0, id)));
        // Per-word sums: 1·q over each 4 bytes, in the low 8 lanes.
        let ws = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8(1), _mm512_zextsi256_si512(bytes));
        let mut sums = [0i32; 8];
        // SAFETY (both stores): each writes exactly the 32 bytes of the referenced array.
        unsafe {
            _mm256_storeu_si256(out.qw.as_mut_ptr().cast(), bytes);
            _mm256_storeu_si256(sums.as_mut_ptr().cast(), _mm512_castsi512_si256(ws));
        }
        out.set_scales(d, sums);
    }
}

/// One tile product with the chosen implementation (falls back to scalar for a path this build
/// lacks, which `KernelPath::available` never offers).
fn tile_with<F: Format, const R: usize>(path: KernelPath, w: &[F::Tile], acts: [&[ActBlock]; R]) -> [[f32; TILE]; R] {
    match (path, F::LANES) {
        // SAFETY (the SIMD arms): these modules are compiled only when the build targets the
        // listed CPU features (`-C target-cpu=native` here), so the instructions are available.
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw", target_feature = "avx512vnni"))]
        (KernelPath::Avx512Vnni, false) => unsafe { avx512::tile::<F, R>(w, acts) },
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512f", target_feature = "avx512bw", target_feature = "avx512vnni"))]
        (KernelPath::Avx512Vnni, true) => unsafe { avx512::tile_lanes::<F, R>(w, acts) },
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
        (KernelPath::Avx2, false) => unsafe { avx2::tile::<F, R>(w, acts) },
        #[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", target_feature = "f16c"))]
        (KernelPath::Avx2, true) => unsafe { avx2::tile_lanes::<F, R>(w, acts) },
        (_, false) => scalar::tile::<F, R>(w, acts),
        (_, true) => scalar::tile_lanes::<F, R>(w, acts),
    }
}

// ---------------------------------------------------------------------------------------------
// Parallel driver.

/// Runs `f` over `0..n_items`, split into ranges, on candle's CPU worker pool (the calling thread
/// takes part). That pool — not rayon's — is what candle 0.11 runs its quantized matmuls and
/// element-wise ops on, sized from `CANDLE_NUM_THREADS`, else `RAYON_NUM_THREADS`; its workers
/// spin between jobs. Sharing it keeps one set of workers: on the 2-core reference machine the
/// same kernels on rayon's global pool decode at ~65-70 t/s instead of ~180-200 (SmolLM2-135M,
/// `-t 2`), the two pools' spinning threads competing for the cores.
fn par_for(n_items: usize, f: impl Fn(Range<usize>) + Sync) {
    match n_items {
        0 => {}
        1 => f(0..1),
        _ => candle_core::utils::barrier_pool().execute_chunked(n_items, f),
    }
}

/// A mutable slice written concurrently by the work items of one parallel call, each item into
/// its own disjoint ranges.
struct SharedMut<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: only hands out disjoint ranges (see `range_mut`) of a slice borrowed mutably for the
// whole parallel call, so sending the pointer to the pool's threads is sound for `T: Send`.
unsafe impl<T: Send> Send for SharedMut<T> {}
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    fn new(s: &mut [T]) -> Self {
        SharedMut { ptr: s.as_mut_ptr(), len: s.len() }
    }

    /// # Safety
    /// No other live reference may overlap `r` (callers give each work item its own ranges).
    #[allow(clippy::mut_from_ref)]
    unsafe fn range_mut(&self, r: Range<usize>) -> &mut [T] {
        assert!(r.start <= r.end && r.end <= self.len, "range {r:?} out of {}", self.len);
        // SAFETY: in bounds (checked above) of the borrowed slice; exclusivity per the contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.end - r.start) }
    }
}

thread_local! {
    /// Quantized input rows, reused across calls on this thread.
    static ACT_SCRATCH: RefCell<Vec<ActBlock>> = const { RefCell::new(Vec::new()) };
}

fn matmul<F: Format>(path: KernelPath, tiles: &[F::Tile], x: &[f32], m: usize, k: usize, n: usize, out: &mut [f32]) {
    const { assert!(F::ROWS >= 1 && F::ROWS <= 6 && ROW_CHUNK.is_multiple_of(F::ROWS)) };
    let nb = k / QK;
    assert_eq!(x.len(), m * k);
    assert_eq!(out.len(), m * n);
    assert_eq!(tiles.len(), n.div_ceil(TILE) * nb);
    ACT_SCRATCH.with(|scratch| {
        let mut acts = scratch.borrow_mut();
        if acts.len() < m * nb {
            acts.resize(m * nb, ActBlock::default());
        }
        let acts = &mut acts[..m * nb];
        // Quantize the input, in parallel for large inputs.
        if m * k >= 1 << 15 {
            let rows_per_item = (4096 / k).max(1);
            let shared = SharedMut::new(acts);
            par_for(m.div_ceil(rows_per_item), |items| {
                for item in items {
                    let rows = item * rows_per_item..m.min((item + 1) * rows_per_item);
                    // SAFETY: each item owns activation rows `rows`, disjoint from other items'.
                    let dst = unsafe { shared.range_mut(rows.start * nb..rows.end * nb) };
                    quantize_row(path, &x[rows.start * k..rows.end * k], dst);
                }
            });
        } else {
            for (row, dst) in x.chunks_exact(k).zip(acts.chunks_exact_mut(nb)) {
                quantize_row(path, row, dst);
            }
        }
        let acts: &[ActBlock] = acts;

        let groups = n.div_ceil(TILE);
        let chunks = m.div_ceil(ROW_CHUNK);
        let shared_out = SharedMut::new(out);
        let act_row = |r: usize| &acts[r * nb..(r + 1) * nb];
        // Item = (weight group, activation-row chunk), group-major.
        par_for(groups * chunks, |items| {
            for item in items {
                let (g, c) = (item / chunks, item % chunks);
                let w = &tiles[g * nb..(g + 1) * nb];
                let cols = g * TILE..n.min((g + 1) * TILE);
                let write = |r0: usize, res: &[[f32; TILE]]| {
                    for (i, vals) in res.iter().enumerate() {
                        let start = (r0 + i) * n + cols.start;
                        // SAFETY: item (g, c) alone writes rows of chunk c at the columns of group g.
                        let dst = unsafe { shared_out.range_mut(start..start + cols.len()) };
                        dst.copy_from_slice(&vals[..cols.len()]);
                    }
                };
                let rows = c * ROW_CHUNK..m.min((c + 1) * ROW_CHUNK);
                let mut r = rows.start;
                while r < rows.end {
                    let take = F::ROWS.min(rows.end - r);
                    macro_rules! run {
                        ($n:literal) => {
                            write(r, &tile_with::<F, $n>(path, w, std::array::from_fn(|i| act_row(r + i))))
                        };
                    }
                    match take {
                        1 => run!(1),
                        2 => run!(2),
                        3 => run!(3),
                        4 => run!(4),
                        5 => run!(5),
                        _ => run!(6),
                    }
                    r += take;
                }
            }
        });
    });
}

// ---------------------------------------------------------------------------------------------
// Public entry point.

enum Packed {
    Q4_1(Vec<TileQ4_1>),
    Q4_0(Vec<TileQ4_0>),
    Q8_0(Vec<TileQ8_0>),
}

/// `x · Wᵀ` for a quantized weight matrix `W` of shape (n_out, k), on the CPU.
pub struct FastQMatMul {
    packed: Packed,
    n_out: usize,
    k: usize,
}

impl FastQMatMul {
    /// Repacks `w`; `None` when its type is not Q4_1, Q4_0 or Q8_0, it is not a CPU tensor, not
    /// 2-D, or its rows are not a whole number of 32-value blocks.
    pub fn new(w: &Arc<QTensor>) -> Option<Self> {
        if !w.device().is_cpu() {
            return None;
        }
        let (n_out, k) = w.shape().dims2().ok()?;
        if n_out == 0 || k == 0 || !k.is_multiple_of(QK) {
            return None;
        }
        let nb = k / QK;
        let data = w.data().ok()?;
        let expect = |bytes: usize| data.len() == n_out * nb * bytes;
        let packed = match w.dtype() {
            GgmlDType::Q4_1 if expect(Q4_1::BLOCK_BYTES) => Packed::Q4_1(repack::<Q4_1>(&data, n_out, nb)),
            GgmlDType::Q4_0 if expect(Q4_0::BLOCK_BYTES) => Packed::Q4_0(repack::<Q4_0>(&data, n_out, nb)),
            GgmlDType::Q8_0 if expect(Q8_0::BLOCK_BYTES) => Packed::Q8_0(repack::<Q8_0>(&data, n_out, nb)),
            _ => return None,
        };
        Some(FastQMatMul { packed, n_out, k })
    }

    /// Weight type of the packed matrix.
    pub fn dtype(&self) -> GgmlDType {
        match self.packed {
            Packed::Q4_1(_) => Q4_1::DTYPE,
            Packed::Q4_0(_) => Q4_0::DTYPE,
            Packed::Q8_0(_) => Q8_0::DTYPE,
        }
    }

    /// (n_out, k).
    pub fn shape(&self) -> (usize, usize) {
        (self.n_out, self.k)
    }

    /// `x` (.., k) → (.., n_out), with the fastest kernel available.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, KernelPath::best())
    }

    /// `forward` with a chosen kernel implementation (for tests and benchmarks).
    pub fn forward_with(&self, x: &Tensor, path: KernelPath) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        match dims.last() {
            Some(&k) if k == self.k => {}
            _ => candle_core::bail!("fast qmatmul: input {:?} does not end in k = {}", x.shape(), self.k),
        }
        if !x.device().is_cpu() {
            candle_core::bail!("fast qmatmul: input must be on the CPU");
        }
        let in_dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let m = x.elem_count() / self.k;
        let mut out = vec![0f32; m * self.n_out];
        {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(cpu) = &*storage else {
                candle_core::bail!("fast qmatmul: input must be on the CPU");
            };
            let xs = &cpu.as_slice::<f32>()?[layout.start_offset()..][..m * self.k];
            self.matmul_slice(path, xs, m, &mut out);
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("non-empty dims") = self.n_out;
        Tensor::from_vec(out, out_dims, &Device::Cpu)?.to_dtype(in_dtype)
    }

    /// `out` (m × n_out, row-major) = `x` (m × k, row-major) · Wᵀ.
    pub fn matmul_slice(&self, path: KernelPath, x: &[f32], m: usize, out: &mut [f32]) {
        let (k, n) = (self.k, self.n_out);
        match &self.packed {
            Packed::Q4_1(t) => matmul::<Q4_1>(path, t, x, m, k, n, out),
            Packed::Q4_0(t) => matmul::<Q4_0>(path, t, x, m, k, n, out),
            Packed::Q8_0(t) => matmul::<Q8_0>(path, t, x, m, k, n, out),
        }
    }
}

/// Whether the model should use the fast kernels: when this build has a SIMD implementation (the
/// scalar one exists for portability and as the reference, but is slower than candle's NEON
/// kernels), unless `HELPLINE_FAST_KERNELS` is `0`/`off`/`false` (kept to measure candle's own
/// kernels on the same build).
pub fn enabled() -> bool {
    KernelPath::best() != KernelPath::Scalar
        && !matches!(std::env::var("HELPLINE_FAST_KERNELS").as_deref(), Ok("0" | "off" | "false"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn f16_conversions_match_hardware_semantics() {
        // Every f16 round-trips exactly.
        for h in 0..=u16::MAX {
            let f = f16_to_f32(h);
            if f.is_nan() {
                assert!(f16_to_f32(f32_to_f16(f)).is_nan());
            } else {
                assert_eq!(f32_to_f16(f), h, "{h:#06x} -> {f}");
            }
        }
        // Ties go to even, below and above the subnormal boundary, and overflow saturates to inf.
        assert_eq!(f32_to_f16(1.0 + 1.0 / 2048.0), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 3.0 / 2048.0), 0x3c02);
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0x0000);
        assert_eq!(f32_to_f16(3.0 * 2f32.powi(-25)), 0x0002);
        assert_eq!(f32_to_f16(2f32.powi(-25) * 1.0001), 0x0001);
        assert_eq!(f32_to_f16(65520.0), 0x7c00);
        assert_eq!(f32_to_f16(65519.0), 0x7bff);
        assert_eq!(f32_to_f16(-0.0), 0x8000);
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "f16c"))]
    #[test]
    fn f32_to_f16_matches_f16c() {
        use std::arch::x86_64::*;
        #[target_feature(enable = "f16c")]
        fn f16c(x: f32) -> u16 {
            _mm_extract_epi16::<0>(_mm_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm_set1_ps(x))) as u16
        }
        // SAFETY: this test is compiled only when the build targets F16C.
        let hw = |x: f32| unsafe { f16c(x) };
        // Every 97th f32 bit pattern over the finite range, plus the dense f16 range around 1.
        let mut bits = 0u32;
        while bits < 0x7f80_0000 {
            for x in [f32::from_bits(bits), -f32::from_bits(bits)] {
                assert_eq!(f32_to_f16(x), hw(x), "{x:e} ({bits:#x})");
            }
            bits += 97;
        }
        for bits in 0x3f00_0000u32..0x3f00_0000 + (1 << 20) {
            let x = f32::from_bits(bits);
            assert_eq!(f32_to_f16(x), hw(x));
        }
    }

    #[test]
    fn quantizers_agree_and_round_half_away() {
        let mut seed = 7u64;
        let mut x: Vec<f32> = (0..32 * 64).map(|i| lcg(&mut seed) * (1 << (i % 20)) as f32 * 1e-4).collect();
        // A block whose quants land exactly on halves (amax 127 → d = 1).
        for (i, v) in x[..32].iter_mut().enumerate() {
            *v = if i == 0 { 127.0 } else { (i as f32 - 16.0) + 0.5 };
        }
        x[32..64].fill(0.0);
        let want = quantize_q8_1_bytes(&x, KernelPath::Scalar);
        assert_eq!(&want[4..36][1..4], &[-15i8 as u8, -14i8 as u8, -13i8 as u8]);
        assert_eq!(want[4 + 16] as i8, 1, "0.5 rounds away from zero");
        for path in KernelPath::available() {
            assert_eq!(quantize_q8_1_bytes(&x, path), want, "{path:?}");
        }
    }

    #[test]
    fn every_path_gives_identical_results() {
        let mut seed = 11u64;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q4_0, GgmlDType::Q8_0] {
            let (n, k) = (37, 96);
            let wv: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let w = Tensor::from_vec(wv, (n, k), &Device::Cpu).unwrap();
            let q = Arc::new(QTensor::quantize(&w, dtype).unwrap());
            let fast = FastQMatMul::new(&q).unwrap();
            for m in [1, 2, 3, 4, 5, 9] {
                let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
                let mut want = vec![0f32; m * n];
                fast.matmul_slice(KernelPath::Scalar, &x, m, &mut want);
                for path in KernelPath::available() {
                    let mut got = vec![0f32; m * n];
                    fast.matmul_slice(path, &x, m, &mut got);
                    assert_eq!(got, want, "{dtype:?} m={m} {path:?}");
                }
            }
        }
    }
}
