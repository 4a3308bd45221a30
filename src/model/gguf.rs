//! A defensive GGUF reader.
//!
//! candle's `gguf_file::Content::read` takes lengths, counts and shapes from the file at face
//! value, so a damaged or hostile file can make it panic or try to allocate terabytes. This
//! module parses the same format itself, checks every length against a sane limit *and* against
//! the bytes actually left in the file before allocating anything, validates every tensor
//! against the file's extent, and only then hands out candle's own [`Content`], so the model
//! code keeps using `content.tensor(&mut reader, name, &device)` unchanged.
//!
//! Format reference: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

/// "GGUF" as it appears on disk.
const MAGIC: [u8; 4] = *b"GGUF";
/// Used when `general.alignment` is absent, as the spec prescribes.
const DEFAULT_ALIGNMENT: u64 = 32;

// Limits. Real models stay orders of magnitude below these (a few hundred tensors, a few dozen
// keys, vocabularies of ~256k entries, chat templates of a few KiB), so anything above them is
// corruption, not a model we are failing to support.
const MAX_TENSORS: u64 = 1 << 20;
const MAX_METADATA_KEYS: u64 = 1 << 20;
const MAX_ARRAY_LEN: u64 = 1 << 24;
const MAX_STRING_LEN: u64 = 1 << 26;
/// Keys and tensor names are identifiers; the spec caps keys at 65535 bytes.
const MAX_NAME_LEN: u64 = u16::MAX as u64;
/// ggml itself never nests arrays; a small limit keeps recursion shallow.
const MAX_ARRAY_NESTING: usize = 4;
/// The most memory the parsed metadata may take, counted as it is held (each array element is a
/// whole `Value`, about 32 bytes even for a u8, plus string bytes) and charged before anything is
/// allocated. The largest vocabularies in use (Gemma 3, 262k tokens with scores, types and merges) take about 50 MiB.
pub const MAX_METADATA_MEMORY: u64 = 128 << 20;
/// GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;

/// Smallest possible encodings, used to reject counts that cannot fit in what is left of the
/// file before anything is allocated for them.
/// Metadata entry: key length (8) + value type (4) + a one-byte value.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Tensor info: name length (8) + n_dims (4) + one dimension (8) + type (4) + offset (8).
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;

/// Everything that can be wrong with a GGUF file, or with a metadata lookup on it.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read GGUF file {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },

    /// A parse error, tagged with the file it came from (only [`GgufFile::open`] knows it).
    #[error("{}: {inner}", path.display())]
    InFile {
        path: PathBuf,
        inner: Box<GgufError>,
    },

    #[error("I/O error while reading GGUF data at offset {offset}: {source}")]
    Io { offset: u64, source: io::Error },

    #[error(
        "truncated GGUF file: reading {location} needs at least {needed} bytes at offset {offset}, \
         but only {remaining} remain (file length {file_len})"
    )]
    Truncated {
        location: String,
        offset: u64,
        needed: u64,
        remaining: u64,
        file_len: u64,
    },

    #[error("not a GGUF file: bad magic {found:02x?} ({}), expected \"GGUF\"", String::from_utf8_lossy(found).escape_debug())]
    BadMagic { found: [u8; 4] },

    #[error("unsupported GGUF version {version}{hint}: only versions 2 and 3 are supported")]
    UnsupportedVersion { version: u32, hint: &'static str },

    #[error("absurd {what}: {value} at offset {offset} (the limit is {limit})")]
    Absurd {
        what: String,
        value: u64,
        offset: u64,
        limit: u64,
    },

    #[error("arrays nested more than {limit} deep in {location} at offset {offset}")]
    NestedTooDeep {
        location: String,
        offset: u64,
        limit: usize,
    },

    #[error("invalid UTF-8 in {location} at offset {offset}")]
    InvalidUtf8 { location: String, offset: u64 },

    #[error("unknown metadata value type {type_id} in {location} at offset {offset}")]
    UnknownValueType {
        location: String,
        type_id: u32,
        offset: u64,
    },

    #[error("invalid boolean byte {byte} in {location} at offset {offset}")]
    InvalidBool {
        location: String,
        byte: u8,
        offset: u64,
    },

    #[error("duplicate metadata key '{key}' at offset {offset}")]
    DuplicateKey { key: String, offset: u64 },

    #[error("duplicate tensor name '{name}' at offset {offset}")]
    DuplicateTensor { name: String, offset: u64 },

    #[error("invalid general.alignment {value}: it must be a non-zero power of two")]
    BadAlignment { value: i128 },

    #[error("invalid general.alignment: expected an integer, found {found}")]
    AlignmentType { found: &'static str },

    #[error("tensor '{tensor}' at offset {offset} has {n_dims} dimensions; expected 1 to 4")]
    BadDimCount {
        tensor: String,
        n_dims: u32,
        offset: u64,
    },

    #[error("tensor '{tensor}' at offset {offset} has a zero dimension (ggml shape {dims:?})")]
    ZeroDim {
        tensor: String,
        dims: Vec<u64>,
        offset: u64,
    },

    #[error("tensor '{tensor}': ggml shape {dims:?} overflows u64 when computing its {what}")]
    ShapeOverflow {
        tensor: String,
        dims: Vec<u64>,
        what: &'static str,
    },

    #[error(
        "tensor '{tensor}': {elements} elements is not a multiple of the {dtype:?} block size {block_size}"
    )]
    NotBlockMultiple {
        tensor: String,
        elements: u64,
        dtype: GgmlDType,
        block_size: u64,
    },

    #[error("unsupported quantization type {type_id} ({}) for tensor '{tensor}' (info at offset {offset})", ggml_type_name(*type_id).unwrap_or("unknown"))]
    UnsupportedType {
        tensor: String,
        type_id: u32,
        offset: u64,
    },

    #[error("tensor '{tensor}': data offset {offset} is not aligned to {alignment} bytes")]
    MisalignedTensor {
        tensor: String,
        offset: u64,
        alignment: u64,
    },

    #[error(
        "tensor '{tensor}': data at {start}..{end} extends past the end of the file (length {file_len})"
    )]
    TensorPastEnd {
        tensor: String,
        start: u128,
        end: u128,
        file_len: u64,
    },

    #[error("tensors '{first}' ({first_start}..{first_end}) and '{second}' (from {second_start}) overlap")]
    TensorOverlap {
        first: String,
        first_start: u64,
        first_end: u64,
        second: String,
        second_start: u64,
    },

    #[error("metadata key '{key}' is missing")]
    MissingKey { key: String },

    #[error("metadata key '{key}' has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },

    #[error("metadata key '{key}' has value {value}, which does not fit in {expected}")]
    OutOfRange {
        key: String,
        value: String,
        expected: &'static str,
    },
}

/// A parsed and fully validated GGUF file.
#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    pub file_len: u64,
}

impl GgufFile {
    /// Opens and validates `path`. Tensor data is not read, only checked to lie inside the file.
    pub fn open(path: &Path) -> Result<GgufFile, GgufError> {
        let open_err = |source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let file_len = file.metadata().map_err(open_err)?.len();
        let content =
            Self::read(&mut BufReader::new(file), file_len).map_err(|inner| GgufError::InFile {
                path: path.to_path_buf(),
                inner: Box::new(inner),
            })?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            file_len,
        })
    }

    /// Parses and validates a GGUF stream of `file_len` bytes, reading from its start.
    ///
    /// The offsets in the returned [`Content`] are absolute, so the same stream (or a fresh
    /// reader over the same file) can be passed to `Content::tensor`.
    pub fn read<R: Read + Seek>(r: &mut R, file_len: u64) -> Result<Content, GgufError> {
        r.seek(SeekFrom::Start(0))
            .map_err(|source| GgufError::Io { offset: 0, source })?;
        Parser {
            r,
            pos: 0,
            file_len,
            held: 0,
        }
        .parse()
    }

    /// `general.architecture`, e.g. "llama" or "gemma3".
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    /// The raw metadata value, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get_opt_str(key)?.ok_or_else(|| missing(key))
    }

    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        self.get_opt_u32(key)?.ok_or_else(|| missing(key))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get_opt_u64(key)?.ok_or_else(|| missing(key))
    }

    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        self.get_opt_f32(key)?.ok_or_else(|| missing(key))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        self.get_opt_bool(key)?.ok_or_else(|| missing(key))
    }

    pub fn get_opt_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.get(key)
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(wrong_type(key, "string", other)),
            })
            .transpose()
    }

    /// Accepts any integer type whose value fits in a u32 (writers disagree on widths).
    pub fn get_opt_u32(&self, key: &str) -> Result<Option<u32>, GgufError> {
        self.get_opt_int(key, "u32")?
            .map(|v| u32::try_from(v).map_err(|_| out_of_range(key, v, "u32")))
            .transpose()
    }

    /// Accepts any integer type whose value fits in a u64.
    pub fn get_opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get_opt_int(key, "u64")?
            .map(|v| u64::try_from(v).map_err(|_| out_of_range(key, v, "u64")))
            .transpose()
    }

    /// Accepts f32, f64 (narrowed) and integers, since converters are not consistent about
    /// which one they write for values like `rope.freq_base`.
    pub fn get_opt_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        let Some(value) = self.get(key) else {
            return Ok(None);
        };
        let v = match *value {
            Value::F32(v) => v,
            Value::F64(v) if v.is_finite() && v.abs() > f32::MAX as f64 => {
                return Err(out_of_range(key, v, "f32"));
            }
            Value::F64(v) => v as f32,
            _ => match int_value(value) {
                Some(i) => i as f32,
                None => return Err(wrong_type(key, "f32", value)),
            },
        };
        Ok(Some(v))
    }

    pub fn get_opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.get(key)
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                other => Err(wrong_type(key, "bool", other)),
            })
            .transpose()
    }

    fn get_opt_int(&self, key: &str, expected: &'static str) -> Result<Option<i128>, GgufError> {
        self.get(key)
            .map(|v| int_value(v).ok_or_else(|| wrong_type(key, expected, v)))
            .transpose()
    }
}

fn missing(key: &str) -> GgufError {
    GgufError::MissingKey {
        key: key.to_owned(),
    }
}

fn wrong_type(key: &str, expected: &'static str, found: &Value) -> GgufError {
    GgufError::WrongType {
        key: key.to_owned(),
        expected,
        found: value_type_name(found),
    }
}

fn out_of_range(key: &str, value: impl fmt::Display, expected: &'static str) -> GgufError {
    GgufError::OutOfRange {
        key: key.to_owned(),
        value: value.to_string(),
        expected,
    }
}

/// Any integer value widened losslessly; `None` for non-integers.
fn int_value(v: &Value) -> Option<i128> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => x.into(),
        Value::I64(x) => x.into(),
        _ => return None,
    })
}

fn value_type_name(v: &Value) -> &'static str {
    match v {
        Value::U8(_) => "u8",
        Value::I8(_) => "i8",
        Value::U16(_) => "u16",
        Value::I16(_) => "i16",
        Value::U32(_) => "u32",
        Value::I32(_) => "i32",
        Value::U64(_) => "u64",
        Value::I64(_) => "i64",
        Value::F32(_) => "f32",
        Value::F64(_) => "f64",
        Value::Bool(_) => "bool",
        Value::String(_) => "string",
        Value::Array(_) => "array",
    }
}

/// The ggml types candle can load. `GgmlDType::from_u32` is crate-private, hence this copy.
fn ggml_dtype(type_id: u32) -> Option<GgmlDType> {
    Some(match type_id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Names from ggml.h, so an unsupported type can be reported as something a user can look up.
fn ggml_type_name(type_id: u32) -> Option<&'static str> {
    // Indexed by type id; 4, 5 and 31..=33, 36..=38 have since been removed from ggml.
    #[rustfmt::skip]
    const NAMES: [&str; 40] = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1",      // 0..
        "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS",    // 10..
        "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64",   // 19..
        "IQ1_M", "BF16", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0",             // 29..
        "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4",                                 // 36..
    ];
    NAMES.get(type_id as usize).copied()
}

/// Metadata value type ids from the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueKind {
    fn from_id(id: u32) -> Option<Self> {
        use ValueKind::*;
        const KINDS: [ValueKind; 13] = [
            U8, I8, U16, I16, U32, I32, F32, Bool, String, Array, U64, I64, F64,
        ];
        KINDS.get(id as usize).copied()
    }

    /// Bytes the smallest value of this kind occupies on disk.
    fn min_size(self) -> u64 {
        use ValueKind::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 | String => 8,
            Array => 4 + 8,
        }
    }
}

/// Where in the file the parser is, for error messages. Cheap to build; only formatted when
/// an error is actually reported.
#[derive(Clone, Copy)]
enum Where<'a> {
    Header,
    /// Everything the header's counts promise will follow it.
    Declared {
        keys: u64,
        tensors: u64,
    },
    Key(u64),
    Value(&'a str),
    TensorName(u64),
    Tensor(&'a str),
    Padding,
}

impl fmt::Display for Where<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Where::Header => f.write_str("the header"),
            Where::Declared { keys, tensors } => {
                write!(
                    f,
                    "the {keys} metadata entries and {tensors} tensor infos the header declares"
                )
            }
            Where::Key(i) => write!(f, "metadata key #{i}"),
            Where::Value(key) => write!(f, "the value of metadata key '{key}'"),
            Where::TensorName(i) => write!(f, "the name of tensor #{i}"),
            Where::Tensor(name) => write!(f, "the info of tensor '{name}'"),
            Where::Padding => f.write_str("the padding before the tensor data"),
        }
    }
}

/// A tensor info as read, before its extent is checked against the data section.
struct RawTensor {
    name: String,
    /// ggml order: innermost dimension first.
    dims: Vec<u64>,
    dtype: GgmlDType,
    offset: u64,
    size_in_bytes: u64,
}

/// Reads through `r` while tracking the position itself, so every bounds check is against the
/// declared file length without extra seeks.
struct Parser<'r, R> {
    r: &'r mut R,
    pos: u64,
    file_len: u64,
    /// Memory the metadata parsed so far takes (see [`MAX_METADATA_MEMORY`]).
    held: u64,
}

impl<R: Read + Seek> Parser<'_, R> {
    fn parse(mut self) -> Result<Content, GgufError> {
        let magic = self.read_array::<4>(Where::Header)?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = self.read_u32(Where::Header)?;
        let magic = match version {
            2 => VersionedMagic::GgufV2,
            3 => VersionedMagic::GgufV3,
            _ => {
                // A big-endian writer stores "GGUF" the same way but the version byte-swapped.
                let hint = if matches!(version.swap_bytes(), 2 | 3) {
                    " (a big-endian file?)"
                } else {
                    ""
                };
                return Err(GgufError::UnsupportedVersion { version, hint });
            }
        };

        let tensor_count = self.read_u64(Where::Header)?;
        self.check_count("tensor count", Where::Header, tensor_count, MAX_TENSORS)?;
        let kv_count = self.read_u64(Where::Header)?;
        self.check_count(
            "metadata key count",
            Where::Header,
            kv_count,
            MAX_METADATA_KEYS,
        )?;
        // Both counts are capped above, so this cannot overflow.
        let needed = kv_count * MIN_KV_BYTES + tensor_count * MIN_TENSOR_INFO_BYTES;
        self.need(
            needed,
            Where::Declared {
                keys: kv_count,
                tensors: tensor_count,
            },
        )?;

        let mut metadata = HashMap::new();
        for i in 0..kv_count {
            let key_offset = self.pos;
            let key = self.read_string(Where::Key(i), MAX_NAME_LEN)?;
            let type_id = self.read_u32(Where::Value(&key))?;
            let value = self.read_value(type_id, Where::Value(&key), 0)?;
            if metadata.contains_key(&key) {
                return Err(GgufError::DuplicateKey {
                    key,
                    offset: key_offset,
                });
            }
            metadata.insert(key, value);
        }
        let alignment = alignment(&metadata)?;

        let mut raw_tensors = Vec::new();
        let mut seen = HashSet::new();
        for i in 0..tensor_count {
            let info_offset = self.pos;
            let tensor = self.read_tensor_info(i)?;
            if !seen.insert(tensor.name.clone()) {
                return Err(GgufError::DuplicateTensor {
                    name: tensor.name,
                    offset: info_offset,
                });
            }
            raw_tensors.push(tensor);
        }

        let tensor_data_offset = self.pos.div_ceil(alignment).checked_mul(alignment);
        let tensor_data_offset = match tensor_data_offset {
            // A file without tensors may legitimately stop right after the infos.
            Some(off) if off <= self.file_len || tensor_count == 0 => off,
            _ => {
                let needed = tensor_data_offset.map_or(u64::MAX, |off| off - self.pos);
                return Err(self.truncated(Where::Padding, needed));
            }
        };
        self.check_extents(&mut raw_tensors, tensor_data_offset, alignment)?;

        let tensor_infos = raw_tensors
            .into_iter()
            .map(|t| {
                // candle keeps shapes in row-major order, the reverse of ggml's.
                let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
                let info = TensorInfo {
                    ggml_dtype: t.dtype,
                    shape: shape.into(),
                    offset: t.offset,
                };
                (t.name, info)
            })
            .collect();
        Ok(Content {
            magic,
            metadata,
            tensor_infos,
            tensor_data_offset,
        })
    }

    fn read_tensor_info(&mut self, index: u64) -> Result<RawTensor, GgufError> {
        let info_offset = self.pos;
        let name = self.read_string(Where::TensorName(index), MAX_NAME_LEN)?;
        let at = Where::Tensor(&name);
        let n_dims = self.read_u32(at)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::BadDimCount {
                tensor: name,
                n_dims,
                offset: info_offset,
            });
        }
        let dims = (0..n_dims)
            .map(|_| self.read_u64(at))
            .collect::<Result<Vec<_>, _>>()?;
        let type_id = self.read_u32(at)?;
        let offset = self.read_u64(at)?;

        if dims.contains(&0) {
            return Err(GgufError::ZeroDim {
                tensor: name,
                dims,
                offset: info_offset,
            });
        }
        let Some(dtype) = ggml_dtype(type_id) else {
            return Err(GgufError::UnsupportedType {
                tensor: name,
                type_id,
                offset: info_offset,
            });
        };
        // candle computes sizes in usize, so they must fit there too, not just in u64.
        let fits = |n: &u64| usize::try_from(*n).is_ok();
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(fits);
        let Some(elements) = elements else {
            return Err(GgufError::ShapeOverflow {
                tensor: name,
                dims,
                what: "element count",
            });
        };
        let block_size = dtype.block_size() as u64;
        if !elements.is_multiple_of(block_size) {
            return Err(GgufError::NotBlockMultiple {
                tensor: name,
                elements,
                dtype,
                block_size,
            });
        }
        let size_in_bytes = (elements / block_size)
            .checked_mul(dtype.type_size() as u64)
            .filter(fits);
        let Some(size_in_bytes) = size_in_bytes else {
            return Err(GgufError::ShapeOverflow {
                tensor: name,
                dims,
                what: "byte size",
            });
        };
        Ok(RawTensor {
            name,
            dims,
            dtype,
            offset,
            size_in_bytes,
        })
    }

    /// Checks every tensor is aligned, inside the file, and not overlapping another one.
    fn check_extents(
        &self,
        tensors: &mut [RawTensor],
        data_offset: u64,
        alignment: u64,
    ) -> Result<(), GgufError> {
        for t in tensors.iter() {
            if !t.offset.is_multiple_of(alignment) {
                return Err(GgufError::MisalignedTensor {
                    tensor: t.name.clone(),
                    offset: t.offset,
                    alignment,
                });
            }
            // u128 so that hostile offsets cannot wrap around into the file.
            let start = data_offset as u128 + t.offset as u128;
            let end = start + t.size_in_bytes as u128;
            if end > self.file_len as u128 {
                return Err(GgufError::TensorPastEnd {
                    tensor: t.name.clone(),
                    start,
                    end,
                    file_len: self.file_len,
                });
            }
        }
        // Every end is now known to fit in the file, so the sums below cannot overflow.
        tensors.sort_unstable_by_key(|t| t.offset);
        for pair in tensors.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            if a.offset + a.size_in_bytes > b.offset {
                return Err(GgufError::TensorOverlap {
                    first: a.name.clone(),
                    first_start: data_offset + a.offset,
                    first_end: data_offset + a.offset + a.size_in_bytes,
                    second: b.name.clone(),
                    second_start: data_offset + b.offset,
                });
            }
        }
        Ok(())
    }

    fn read_value(&mut self, type_id: u32, at: Where, depth: usize) -> Result<Value, GgufError> {
        let Some(kind) = ValueKind::from_id(type_id) else {
            return Err(GgufError::UnknownValueType {
                location: at.to_string(),
                type_id,
                offset: self.pos - 4,
            });
        };
        self.read_kind(kind, at, depth)
    }

    fn read_kind(&mut self, kind: ValueKind, at: Where, depth: usize) -> Result<Value, GgufError> {
        Ok(match kind {
            ValueKind::U8 => Value::U8(u8::from_le_bytes(self.read_array(at)?)),
            ValueKind::I8 => Value::I8(i8::from_le_bytes(self.read_array(at)?)),
            ValueKind::U16 => Value::U16(u16::from_le_bytes(self.read_array(at)?)),
            ValueKind::I16 => Value::I16(i16::from_le_bytes(self.read_array(at)?)),
            ValueKind::U32 => Value::U32(self.read_u32(at)?),
            ValueKind::I32 => Value::I32(i32::from_le_bytes(self.read_array(at)?)),
            ValueKind::U64 => Value::U64(self.read_u64(at)?),
            ValueKind::I64 => Value::I64(i64::from_le_bytes(self.read_array(at)?)),
            ValueKind::F32 => Value::F32(f32::from_le_bytes(self.read_array(at)?)),
            ValueKind::F64 => Value::F64(f64::from_le_bytes(self.read_array(at)?)),
            ValueKind::Bool => match self.read_array::<1>(at)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                byte => {
                    let offset = self.pos - 1;
                    return Err(GgufError::InvalidBool {
                        location: at.to_string(),
                        byte,
                        offset,
                    });
                }
            },
            ValueKind::String => Value::String(self.read_string(at, MAX_STRING_LEN)?),
            ValueKind::Array => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(GgufError::NestedTooDeep {
                        location: at.to_string(),
                        offset: self.pos,
                        limit: MAX_ARRAY_NESTING,
                    });
                }
                let elem_type = self.read_u32(at)?;
                let Some(elem_kind) = ValueKind::from_id(elem_type) else {
                    return Err(GgufError::UnknownValueType {
                        location: at.to_string(),
                        type_id: elem_type,
                        offset: self.pos - 4,
                    });
                };
                let len = self.read_u64(at)?;
                self.check_count("array length", at, len, MAX_ARRAY_LEN)?;
                // Bounded by the limit, by the file and by the memory budget (an element takes a
                // whole `Value` in memory, however small it is in the file), so this allocation
                // is safe.
                self.need(len * elem_kind.min_size(), at)?;
                self.charge(len * std::mem::size_of::<Value>() as u64, at)?;
                let mut items = Vec::with_capacity(len as usize);
                for _ in 0..len {
                    items.push(self.read_kind(elem_kind, at, depth + 1)?);
                }
                Value::Array(items)
            }
        })
    }

    /// Counts `bytes` more of held metadata against [`MAX_METADATA_MEMORY`].
    fn charge(&mut self, bytes: u64, at: Where) -> Result<(), GgufError> {
        self.held = self.held.saturating_add(bytes);
        if self.held > MAX_METADATA_MEMORY {
            return Err(GgufError::Absurd {
                what: format!("metadata size in memory (bytes, up to and including {at})"),
                value: self.held,
                offset: self.pos,
                limit: MAX_METADATA_MEMORY,
            });
        }
        Ok(())
    }

    fn read_string(&mut self, at: Where, max_len: u64) -> Result<String, GgufError> {
        let len = self.read_u64(at)?;
        self.check_count("string length", at, len, max_len)?;
        let start = self.pos;
        self.need(len, at)?;
        self.charge(len, at)?;
        let mut bytes = vec![0; len as usize];
        self.read_exact(&mut bytes, at)?;
        // Some writers NUL-terminate strings despite the spec; candle tolerates it too.
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        String::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 {
            location: at.to_string(),
            offset: start,
        })
    }

    /// Rejects a count or length above `limit`, just read as the last 8 bytes. Whether the file
    /// can hold that many items is checked by the caller with [`Self::need`], since only it
    /// knows the per-item size.
    fn check_count(&self, what: &str, at: Where, value: u64, limit: u64) -> Result<(), GgufError> {
        if value > limit {
            let what = format!("{what} in {at}");
            return Err(GgufError::Absurd {
                what,
                value,
                offset: self.pos - 8,
                limit,
            });
        }
        Ok(())
    }

    /// Fails unless `needed` more bytes exist after the current position.
    fn need(&self, needed: u64, at: Where) -> Result<(), GgufError> {
        if needed > self.remaining() {
            return Err(self.truncated(at, needed));
        }
        Ok(())
    }

    fn remaining(&self) -> u64 {
        self.file_len.saturating_sub(self.pos)
    }

    fn truncated(&self, at: Where, needed: u64) -> GgufError {
        GgufError::Truncated {
            location: at.to_string(),
            offset: self.pos,
            needed,
            remaining: self.remaining(),
            file_len: self.file_len,
        }
    }

    fn read_exact(&mut self, buf: &mut [u8], at: Where) -> Result<(), GgufError> {
        self.need(buf.len() as u64, at)?;
        match self.r.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            // The stream is shorter than the length we were told.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.truncated(at, buf.len() as u64))
            }
            Err(source) => Err(GgufError::Io {
                offset: self.pos,
                source,
            }),
        }
    }

    fn read_array<const N: usize>(&mut self, at: Where) -> Result<[u8; N], GgufError> {
        let mut buf = [0; N];
        self.read_exact(&mut buf, at)?;
        Ok(buf)
    }

    fn read_u32(&mut self, at: Where) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.read_array(at)?))
    }

    fn read_u64(&mut self, at: Where) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.read_array(at)?))
    }
}

/// `general.alignment`: any integer type is accepted, but it must be a power of two.
fn alignment(metadata: &HashMap<String, Value>) -> Result<u64, GgufError> {
    let Some(value) = metadata.get("general.alignment") else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let Some(v) = int_value(value) else {
        return Err(GgufError::AlignmentType {
            found: value_type_name(value),
        });
    };
    match u64::try_from(v) {
        Ok(a) if a.is_power_of_two() => Ok(a),
        _ => Err(GgufError::BadAlignment { value: v }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, QTensor};
    use candle_core::{Device, Tensor};
    use std::io::Cursor;

    fn sample_file() -> Vec<u8> {
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 64., &dev)
            .unwrap()
            .reshape((2, 32))
            .unwrap();
        let qa = QTensor::quantize(&a, GgmlDType::Q8_0).unwrap();
        let b = Tensor::new(&[1f32, 2., 3.], &dev).unwrap();
        let qb = QTensor::quantize(&b, GgmlDType::F32).unwrap();
        let arch = Value::String("llama".into());
        let n = Value::U32(7);
        let eps = Value::F32(1e-5);
        let small = Value::U8(3);
        let neg = Value::I32(-1);
        let tokens = Value::Array(vec![Value::String("a".into()), Value::String("b".into())]);
        let mut buf = Cursor::new(Vec::new());
        gguf_file::write(
            &mut buf,
            &[
                ("general.architecture", &arch),
                ("llama.block_count", &n),
                ("llama.eps", &eps),
                ("small", &small),
                ("negative", &neg),
                ("tokenizer.ggml.tokens", &tokens),
            ],
            &[("a", &qa), ("b", &qb)],
        )
        .unwrap();
        buf.into_inner()
    }

    fn open_bytes(bytes: &[u8]) -> GgufFile {
        let content = GgufFile::read(&mut Cursor::new(bytes), bytes.len() as u64).unwrap();
        GgufFile {
            path: PathBuf::new(),
            content,
            file_len: bytes.len() as u64,
        }
    }

    #[test]
    fn round_trips_candle_writer() {
        let bytes = sample_file();
        let file = open_bytes(&bytes);
        let theirs = Content::read(&mut Cursor::new(&bytes)).unwrap();
        assert_eq!(file.content.tensor_data_offset, theirs.tensor_data_offset);
        assert_eq!(file.content.metadata.len(), 6);
        for (name, info) in &theirs.tensor_infos {
            let ours = &file.content.tensor_infos[name];
            assert_eq!(ours.shape, info.shape);
            assert_eq!(ours.offset, info.offset);
            assert_eq!(ours.ggml_dtype, info.ggml_dtype);
        }
        let a = file
            .content
            .tensor(&mut Cursor::new(&bytes), "a", &Device::Cpu)
            .unwrap();
        assert_eq!(a.shape().dims(), &[2, 32]);
        let b = file
            .content
            .tensor(&mut Cursor::new(&bytes), "b", &Device::Cpu)
            .unwrap();
        let b: Vec<f32> = b.dequantize(&Device::Cpu).unwrap().to_vec1().unwrap();
        assert_eq!(b, [1., 2., 3.]);
    }

    #[test]
    fn typed_accessors() {
        let file = open_bytes(&sample_file());
        assert_eq!(file.architecture().unwrap(), "llama");
        assert_eq!(file.get_u32("llama.block_count").unwrap(), 7);
        assert_eq!(file.get_u32("small").unwrap(), 3);
        assert_eq!(file.get_u64("small").unwrap(), 3);
        assert_eq!(file.get_f32("llama.eps").unwrap(), 1e-5);
        assert_eq!(file.get_opt_u32("absent").unwrap(), None);
        assert_eq!(file.get_opt_f32("absent").unwrap(), None);
        assert_eq!(file.get_opt_str("absent").unwrap(), None);

        let err = file.get_u32("negative").unwrap_err().to_string();
        assert!(
            err.contains("negative") && err.contains("-1") && err.contains("u32"),
            "{err}"
        );
        let err = file.get_str("llama.block_count").unwrap_err().to_string();
        assert!(
            err.contains("llama.block_count") && err.contains("string") && err.contains("u32"),
            "{err}"
        );
        let err = file
            .get_opt_u32("general.architecture")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("general.architecture") && err.contains("has type string"),
            "{err}"
        );
        let err = file.get_f32("missing.key").unwrap_err().to_string();
        assert!(
            err.contains("missing.key") && err.contains("missing"),
            "{err}"
        );
    }

    #[test]
    fn reads_at_any_stream_position() {
        let bytes = sample_file();
        let mut cursor = Cursor::new(&bytes);
        cursor.set_position(17);
        let content = GgufFile::read(&mut cursor, bytes.len() as u64).unwrap();
        assert_eq!(content.tensor_infos.len(), 2);
    }

    #[test]
    fn reads_real_models_like_candle() {
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let mut checked = 0;
        for name in [
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "gemma-3-270m-Q4_K_M.gguf",
        ] {
            let path = models.join(name);
            if !path.exists() {
                eprintln!("skipping {}: not downloaded", path.display());
                continue;
            }
            let ours = GgufFile::open(&path).unwrap();
            let theirs = Content::read(&mut BufReader::new(File::open(&path).unwrap())).unwrap();
            assert_eq!(ours.content.tensor_infos.len(), theirs.tensor_infos.len());
            assert_eq!(ours.content.metadata.len(), theirs.metadata.len());
            assert_eq!(ours.content.tensor_data_offset, theirs.tensor_data_offset);
            for (name, info) in &theirs.tensor_infos {
                let mine = &ours.content.tensor_infos[name];
                assert_eq!(
                    (&mine.shape, mine.offset, mine.ggml_dtype),
                    (&info.shape, info.offset, info.ggml_dtype)
                );
            }
            assert!(!ours.architecture().unwrap().is_empty());
            checked += 1;
        }
        // The SmolLM2 model is part of the repository's setup; it must have been read.
        assert!(
            checked >= 1,
            "no model files found under {}",
            models.display()
        );
    }

    #[test]
    fn type_names() {
        assert_eq!(ggml_type_name(16), Some("IQ2_XXS"));
        assert_eq!(ggml_type_name(29), Some("IQ1_M"));
        assert_eq!(ggml_type_name(30), Some("BF16"));
        assert_eq!(ggml_type_name(1000), None);
        for id in 0..40 {
            if let Some(dtype) = ggml_dtype(id) {
                assert!(ggml_type_name(id).is_some(), "{dtype:?}");
            }
        }
    }
}
