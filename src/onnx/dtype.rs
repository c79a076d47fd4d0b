//! ONNX element types: codes, names and storage widths in one table.

/// An ONNX `TensorProto.DataType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DataType(pub i32);

struct TypeRow {
    code: i32,
    name: &'static str,
    /// Storage bits per element (4 for the packed 4-bit types); 0 for variable-size (string).
    bits: u32,
}

const TYPES: &[TypeRow] = &[
    TypeRow {
        code: 1,
        name: "float32",
        bits: 32,
    },
    TypeRow {
        code: 2,
        name: "uint8",
        bits: 8,
    },
    TypeRow {
        code: 3,
        name: "int8",
        bits: 8,
    },
    TypeRow {
        code: 4,
        name: "uint16",
        bits: 16,
    },
    TypeRow {
        code: 5,
        name: "int16",
        bits: 16,
    },
    TypeRow {
        code: 6,
        name: "int32",
        bits: 32,
    },
    TypeRow {
        code: 7,
        name: "int64",
        bits: 64,
    },
    TypeRow {
        code: 8,
        name: "string",
        bits: 0,
    },
    TypeRow {
        code: 9,
        name: "bool",
        bits: 8,
    },
    TypeRow {
        code: 10,
        name: "float16",
        bits: 16,
    },
    TypeRow {
        code: 11,
        name: "float64",
        bits: 64,
    },
    TypeRow {
        code: 12,
        name: "uint32",
        bits: 32,
    },
    TypeRow {
        code: 13,
        name: "uint64",
        bits: 64,
    },
    TypeRow {
        code: 14,
        name: "complex64",
        bits: 64,
    },
    TypeRow {
        code: 15,
        name: "complex128",
        bits: 128,
    },
    TypeRow {
        code: 16,
        name: "bfloat16",
        bits: 16,
    },
    TypeRow {
        code: 17,
        name: "float8e4m3fn",
        bits: 8,
    },
    TypeRow {
        code: 18,
        name: "float8e4m3fnuz",
        bits: 8,
    },
    TypeRow {
        code: 19,
        name: "float8e5m2",
        bits: 8,
    },
    TypeRow {
        code: 20,
        name: "float8e5m2fnuz",
        bits: 8,
    },
    TypeRow {
        code: 21,
        name: "uint4",
        bits: 4,
    },
    TypeRow {
        code: 22,
        name: "int4",
        bits: 4,
    },
    TypeRow {
        code: 23,
        name: "float4e2m1",
        bits: 4,
    },
    TypeRow {
        code: 24,
        name: "float8e8m0",
        bits: 8,
    },
    TypeRow {
        code: 25,
        name: "uint2",
        bits: 2,
    },
    TypeRow {
        code: 26,
        name: "int2",
        bits: 2,
    },
];

impl DataType {
    /// No type: an optional graph value left out.
    pub const UNDEFINED: DataType = DataType(0);
    pub const FLOAT: DataType = DataType(1);
    pub const UINT8: DataType = DataType(2);
    pub const INT8: DataType = DataType(3);
    pub const INT32: DataType = DataType(6);
    pub const INT64: DataType = DataType(7);
    pub const BOOL: DataType = DataType(9);
    pub const FLOAT16: DataType = DataType(10);
    pub const BFLOAT16: DataType = DataType(16);
    pub const FLOAT8E4M3FN: DataType = DataType(17);
    pub const FLOAT8E5M2: DataType = DataType(19);
    pub const INT4: DataType = DataType(22);
    pub const FLOAT4E2M1: DataType = DataType(23);
    pub const FLOAT8E8M0: DataType = DataType(24);

    fn row(self) -> Option<&'static TypeRow> {
        TYPES.iter().find(|r| r.code == self.0)
    }

    pub fn name(self) -> String {
        self.row()
            .map(|r| r.name.to_string())
            .unwrap_or_else(|| format!("dtype#{}", self.0))
    }

    pub fn from_name(name: &str) -> Option<DataType> {
        TYPES
            .iter()
            .find(|r| r.name == name)
            .map(|r| DataType(r.code))
    }

    /// Storage bits per element; None for unknown or variable-size types.
    pub fn bits(self) -> Option<u32> {
        self.row().map(|r| r.bits).filter(|&b| b > 0)
    }

    /// Bytes taken by `count` packed elements (sub-byte types round up).
    pub fn storage_bytes(self, count: u64) -> Option<u64> {
        self.bits()
            .and_then(|b| count.checked_mul(b as u64))
            .map(|bits| bits.div_ceil(8))
    }

    /// True for the float8/float4 formats a Q/DQ pair uses to mark low-precision compute.
    pub fn is_low_precision_float(self) -> bool {
        matches!(self.0, 17..=20 | 23 | 24)
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}
