//! Every kind of damage `GgufFile::open` must reject with a specific error, without panicking
//! and without allocating what the file claims it needs.

use std::time::{Duration, Instant};

use helpline::model::gguf::GgufFile;

const F32: u32 = 0;
const Q4_0: u32 = 2;
const IQ2_XXS: u32 = 16;
// Metadata value type ids.
const T_U8: u32 = 0;
const T_U32: u32 = 4;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;

/// Little-endian GGUF byte builder.
#[derive(Clone, Default)]
struct Gguf(Vec<u8>);

impl Gguf {
    fn header(tensors: u64, kvs: u64) -> Self {
        Self::versioned(3, tensors, kvs)
    }

    fn versioned(version: u32, tensors: u64, kvs: u64) -> Self {
        Gguf::default()
            .raw(b"GGUF")
            .u32(version)
            .u64(tensors)
            .u64(kvs)
    }

    fn raw(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    fn u32(self, v: u32) -> Self {
        self.raw(&v.to_le_bytes())
    }

    fn u64(self, v: u64) -> Self {
        self.raw(&v.to_le_bytes())
    }

    fn str(self, s: &str) -> Self {
        self.bytes_str(s.as_bytes())
    }

    fn bytes_str(self, s: &[u8]) -> Self {
        self.u64(s.len() as u64).raw(s)
    }

    fn kv_u32(self, key: &str, v: u32) -> Self {
        self.str(key).u32(T_U32).u32(v)
    }

    fn kv_str(self, key: &str, v: &str) -> Self {
        self.str(key).u32(T_STRING).str(v)
    }

    fn tensor(self, name: &str, dims: &[u64], ggml_type: u32, offset: u64) -> Self {
        let mut t = self.str(name).u32(dims.len() as u32);
        for &d in dims {
            t = t.u64(d);
        }
        t.u32(ggml_type).u64(offset)
    }

    fn pad_to(self, align: usize) -> Self {
        let n = self.0.len().next_multiple_of(align) - self.0.len();
        self.zeros(n)
    }

    fn zeros(self, n: usize) -> Self {
        self.raw(&vec![0; n])
    }

    fn cut(mut self, len: usize) -> Self {
        self.0.truncate(len);
        self
    }
}

/// A valid file: one metadata entry and one F32 tensor of 4 elements.
fn valid() -> Gguf {
    Gguf::header(1, 1)
        .kv_str("general.architecture", "llama")
        .tensor("w", &[4], F32, 0)
        .pad_to(32)
        .zeros(16)
}

fn open(file: &Gguf) -> Result<GgufFile, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, &file.0).unwrap();
    GgufFile::open(&path).map_err(|e| e.to_string())
}

/// Opens `file`, expects an error mentioning every word in `words`, and returns the message.
#[track_caller]
fn expect_err(file: &Gguf, words: &[&str]) -> String {
    let msg = match open(file) {
        Ok(_) => panic!("malformed file was accepted; expected an error mentioning {words:?}"),
        Err(msg) => msg,
    };
    for word in words {
        assert!(
            msg.contains(word),
            "error {msg:?} does not mention {word:?}"
        );
    }
    msg
}

#[test]
fn helper_builds_valid_files() {
    let file = open(&valid()).unwrap();
    assert_eq!(file.architecture().unwrap(), "llama");
    assert_eq!(file.content.tensor_infos["w"].shape.dims(), &[4]);
    assert_eq!(file.content.tensor_data_offset % 32, 0);
    // Version 2 has the same layout.
    let mut v2 = valid();
    v2.0[4] = 2;
    open(&v2).unwrap();
}

#[test]
fn truncated_in_header() {
    expect_err(&valid().cut(12), &["truncated", "header", "offset 8"]);
    expect_err(&Gguf::default().raw(b"GG"), &["truncated", "header"]);
    expect_err(&Gguf::default(), &["truncated"]);
}

#[test]
fn truncated_in_key() {
    let file = Gguf::header(0, 1)
        .u64(20)
        .raw(b"general.architecture")
        .cut(24 + 8 + 7);
    expect_err(&file, &["truncated", "metadata key #0"]);
}

#[test]
fn truncated_in_value() {
    let file = Gguf::header(0, 1)
        .str("general.name")
        .u32(T_STRING)
        .u64(10)
        .raw(b"abc");
    expect_err(&file, &["truncated", "'general.name'"]);
    let file = Gguf::header(0, 1)
        .str("llama.block_count")
        .u32(T_U32)
        .raw(&[1, 0]);
    expect_err(&file, &["truncated", "'llama.block_count'"]);
}

#[test]
fn truncated_in_tensor_infos() {
    let name = "blk.0.attn_q.weight.long.enough.name";
    let full = Gguf::header(1, 0).tensor(name, &[32, 32], F32, 0);
    let cut = full.0.len() - 14; // inside the second dimension
    expect_err(&full.cut(cut), &["truncated", name]);
}

#[test]
fn truncated_in_padding() {
    let infos_end = Gguf::header(1, 1)
        .kv_str("general.architecture", "llama")
        .tensor("w", &[4], F32, 0)
        .0
        .len();
    assert_ne!(infos_end % 32, 0, "test needs padding after the infos");
    expect_err(&valid().cut(infos_end + 1), &["truncated", "padding"]);
}

#[test]
fn bad_magic() {
    let mut file = valid();
    file.0[..4].copy_from_slice(b"GGML");
    expect_err(&file, &["magic", "GGML"]);
}

#[test]
fn unsupported_version() {
    for version in [0, 1, 4, 999] {
        let mut file = valid();
        file.0[4..8].copy_from_slice(&u32::to_le_bytes(version));
        expect_err(
            &file,
            &["unsupported", &format!("version {version}"), "2 and 3"],
        );
    }
    // A big-endian file stores the version byte-swapped.
    let mut file = valid();
    file.0[4..8].copy_from_slice(&3u32.to_be_bytes());
    expect_err(&file, &["version", "big-endian"]);
}

#[test]
fn absurd_counts_fail_fast_without_allocating() {
    let cases = [
        (Gguf::header(1 << 60, 0), "tensor count"),
        (Gguf::header(0, 1 << 60), "metadata key count"),
        (
            Gguf::header(0, 1)
                .str("tokens")
                .u32(T_ARRAY)
                .u32(T_U8)
                .u64(1 << 62),
            "array length",
        ),
        (
            Gguf::header(0, 1).str("name").u32(T_STRING).u64(1 << 63),
            "string length",
        ),
        (Gguf::header(0, 1).u64(1 << 63), "string length"),
    ];
    for (file, what) in cases {
        let start = Instant::now();
        expect_err(&file.zeros(64), &["absurd", what]);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{what}: took {:?}",
            start.elapsed()
        );
    }
}

#[test]
fn counts_larger_than_the_file() {
    // Under the sanity limits, but more than the remaining bytes can hold.
    expect_err(
        &Gguf::header(1000, 0).zeros(64),
        &["truncated", "1000 tensor infos"],
    );
    expect_err(
        &Gguf::header(0, 1000).zeros(64),
        &["truncated", "1000 metadata entries"],
    );
    let array = Gguf::header(0, 1)
        .str("scores")
        .u32(T_ARRAY)
        .u32(T_U64)
        .u64(1000)
        .zeros(64);
    expect_err(&array, &["truncated", "'scores'", "8000 bytes"]);
    let string = Gguf::header(0, 1)
        .str("name")
        .u32(T_STRING)
        .u64(100_000)
        .zeros(64);
    expect_err(&string, &["truncated", "'name'", "100000 bytes"]);
}

#[test]
fn nested_arrays_too_deep() {
    let mut file = Gguf::header(0, 1).str("nested").u32(T_ARRAY);
    for _ in 0..32 {
        file = file.u32(T_ARRAY).u64(1);
    }
    expect_err(&file.u32(T_U8).u64(1).raw(&[7]), &["nested", "'nested'"]);
}

#[test]
fn invalid_utf8() {
    let key = Gguf::header(0, 1)
        .bytes_str(b"general.\xff\xfe")
        .u32(T_U32)
        .u32(1);
    expect_err(&key, &["invalid UTF-8", "metadata key #0"]);
    let value = Gguf::header(0, 1)
        .str("general.name")
        .u32(T_STRING)
        .bytes_str(b"caf\xc3");
    expect_err(&value, &["invalid UTF-8", "'general.name'"]);
    let tensor = Gguf::header(1, 0)
        .bytes_str(b"\x80bad")
        .u32(1)
        .u64(4)
        .u32(F32)
        .u64(0)
        .pad_to(32)
        .zeros(16);
    expect_err(&tensor, &["invalid UTF-8", "tensor #0"]);
}

#[test]
fn unknown_value_type() {
    expect_err(
        &Gguf::header(0, 1).str("odd").u32(13).zeros(16),
        &["unknown metadata value type 13", "'odd'"],
    );
    let array = Gguf::header(0, 1)
        .str("odd.array")
        .u32(T_ARRAY)
        .u32(77)
        .u64(1)
        .zeros(16);
    expect_err(&array, &["unknown metadata value type 77", "'odd.array'"]);
}

#[test]
fn invalid_bool() {
    expect_err(
        &Gguf::header(0, 1).str("flag").u32(T_BOOL).raw(&[2]),
        &["boolean", "'flag'"],
    );
}

#[test]
fn duplicate_key() {
    let file = Gguf::header(0, 2)
        .kv_u32("llama.block_count", 1)
        .kv_u32("llama.block_count", 2);
    expect_err(&file, &["duplicate metadata key", "'llama.block_count'"]);
}

#[test]
fn duplicate_tensor_name() {
    let file = Gguf::header(2, 0)
        .tensor("w", &[8], F32, 0)
        .tensor("w", &[8], F32, 32)
        .pad_to(32)
        .zeros(64);
    expect_err(&file, &["duplicate tensor", "'w'"]);
}

#[test]
fn bad_alignment() {
    let with_alignment = |kv: Gguf| kv.tensor("w", &[4], F32, 0).pad_to(64).zeros(64);
    for value in [0, 48, 3] {
        let file = with_alignment(Gguf::header(1, 1).kv_u32("general.alignment", value));
        expect_err(
            &file,
            &["general.alignment", &value.to_string(), "power of two"],
        );
    }
    let file = with_alignment(Gguf::header(1, 1).kv_str("general.alignment", "32"));
    expect_err(&file, &["general.alignment", "integer", "string"]);
    // Any integer type holding a power of two is fine.
    let file = with_alignment(
        Gguf::header(1, 1)
            .str("general.alignment")
            .u32(T_U64)
            .u64(64),
    );
    assert_eq!(open(&file).unwrap().content.tensor_data_offset % 64, 0);
}

#[test]
fn bad_dimension_count() {
    for n_dims in [0usize, 5] {
        let dims = vec![2u64; n_dims];
        let file = Gguf::header(1, 0)
            .tensor("t", &dims, F32, 0)
            .pad_to(32)
            .zeros(256);
        expect_err(&file, &["'t'", &format!("{n_dims} dimensions")]);
    }
}

#[test]
fn zero_dimension() {
    let file = Gguf::header(1, 0)
        .tensor("empty", &[4, 0], F32, 0)
        .pad_to(32)
        .zeros(32);
    expect_err(&file, &["'empty'", "zero dimension"]);
}

#[test]
fn shape_overflow() {
    let elems = Gguf::header(1, 0)
        .tensor("huge", &[1 << 32, 1 << 32, 2], F32, 0)
        .pad_to(32)
        .zeros(32);
    expect_err(&elems, &["'huge'", "overflow", "element count"]);
    let bytes = Gguf::header(1, 0)
        .tensor("wide", &[1 << 62], F32, 0)
        .pad_to(32)
        .zeros(32);
    expect_err(&bytes, &["'wide'", "overflow", "byte size"]);
}

#[test]
fn not_a_multiple_of_the_block_size() {
    let file = Gguf::header(1, 0)
        .tensor("q", &[33], Q4_0, 0)
        .pad_to(32)
        .zeros(64);
    expect_err(&file, &["'q'", "33 elements", "block size 32"]);
}

#[test]
fn unsupported_quantization_type() {
    let file = Gguf::header(1, 0)
        .tensor("blk.0.ffn_up.weight", &[256], IQ2_XXS, 0)
        .pad_to(32)
        .zeros(256);
    expect_err(
        &file,
        &[
            "unsupported quantization type 16 (IQ2_XXS)",
            "'blk.0.ffn_up.weight'",
        ],
    );
    let file = Gguf::header(1, 0)
        .tensor("x", &[256], 12345, 0)
        .pad_to(32)
        .zeros(256);
    expect_err(
        &file,
        &["unsupported quantization type 12345 (unknown)", "'x'"],
    );
}

#[test]
fn misaligned_tensor_offset() {
    let file = Gguf::header(1, 0)
        .tensor("w", &[4], F32, 4)
        .pad_to(32)
        .zeros(64);
    expect_err(&file, &["'w'", "offset 4", "not aligned to 32"]);
}

#[test]
fn tensor_data_past_the_end() {
    let file = Gguf::header(1, 0)
        .tensor("w", &[1000], F32, 0)
        .pad_to(32)
        .zeros(16);
    let len = file.0.len();
    expect_err(&file, &["'w'", "past the end", &format!("length {len}")]);
    // An offset so large that start + size would wrap around u64.
    let file = Gguf::header(1, 0)
        .tensor("far", &[8], F32, u64::MAX - 31)
        .pad_to(32)
        .zeros(32);
    expect_err(&file, &["'far'", "past the end"]);
}

#[test]
fn overlapping_tensors() {
    let file = Gguf::header(2, 0)
        .tensor("a", &[16], F32, 0)
        .tensor("b", &[8], F32, 32)
        .pad_to(32)
        .zeros(96);
    expect_err(&file, &["overlap", "'a'", "'b'"]);
}

#[test]
fn error_names_the_file() {
    let msg = expect_err(&valid().cut(12), &["truncated"]);
    assert!(msg.contains("model.gguf"), "{msg}");
    let missing = GgufFile::open(std::path::Path::new("/nonexistent/x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("/nonexistent/x.gguf"), "{missing}");
}

/// An array is charged its size in memory, not in the file: each element is a whole metadata
/// value (about 32 bytes) even when it is one byte on disk. 8 MiB of u8 elements would hold
/// about 256 MiB, over the bound, and is refused before anything is allocated; 1 MiB is fine.
#[test]
fn arrays_are_bounded_by_their_size_in_memory() {
    let n = 8u64 << 20;
    let big = Gguf::header(0, 1).str("blob").u32(T_ARRAY).u32(T_U8).u64(n).zeros(n as usize);
    let start = Instant::now();
    let msg = expect_err(&big, &["absurd", "metadata size in memory", "'blob'"]);
    assert!(msg.contains(&helpline::model::gguf::MAX_METADATA_MEMORY.to_string()), "{msg}");
    assert!(start.elapsed() < Duration::from_secs(2), "refused before reading: {:?}", start.elapsed());

    let n = 1u64 << 20;
    let ok = Gguf::header(0, 1).str("blob").u32(T_ARRAY).u32(T_U8).u64(n).zeros(n as usize);
    let f = open(&ok).expect("a 1 MiB u8 array is within the bound");
    let _ = f;
}
