//! Writing ONNX files, with large initializers in an external data file at aligned offsets (so TensorRT and
//! ONNX Runtime can map them), both files written under temporary names and renamed when complete.
use super::proto::{DATA_LOCATION_EXTERNAL, ModelProto, StringStringEntryProto};
use crate::fsutil::AtomicFile;
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use prost::Message;
use std::io::Write;
use std::path::Path;

/// Protobuf's hard limit on one serialized message.
const PROTOBUF_LIMIT: usize = (2u64 << 30) as usize - 1;

pub struct SaveOptions {
    /// Initializers of at least this many bytes go to the external data file; None keeps everything inline.
    pub external_threshold: Option<usize>,
}

impl Default for SaveOptions {
    fn default() -> Self {
        Self {
            external_threshold: Some(1024),
        }
    }
}

/// Writes `model` to `path` (and `<file name>.data` beside it when tensors go external). Returns bytes written.
pub fn save(mut model: ModelProto, path: &Path, opts: &SaveOptions) -> Result<u64> {
    let file_name = path
        .file_name()
        .with_context(|| format!("'{}' is not a file path", path.display()))?
        .to_string_lossy()
        .into_owned();
    let data_name = format!("{file_name}.data");
    let data_path = path.with_file_name(&data_name);
    let mut data_file: Option<AtomicFile> = None;
    let mut offset: u64 = 0;
    let mut total: u64 = 0;
    if let (Some(threshold), Some(graph)) = (opts.external_threshold, model.graph.as_mut()) {
        for t in graph.initializer.iter_mut() {
            if t.raw_data.len() < threshold {
                continue;
            }
            let f = match data_file.as_mut() {
                Some(f) => f,
                None => data_file.insert(AtomicFile::create(&data_path)?),
            };
            // Page alignment lets readers mmap big tensors directly; small ones only need 64-byte alignment.
            let align: u64 = if t.raw_data.len() >= (1 << 20) {
                4096
            } else {
                64
            };
            let pad = offset.next_multiple_of(align) - offset;
            f.write_all(&vec![0u8; pad as usize])?;
            offset += pad;
            let data = std::mem::replace(&mut t.raw_data, Bytes::new());
            f.write_all(&data)
                .with_context(|| format!("writing '{}' failed", data_path.display()))?;
            t.data_location = DATA_LOCATION_EXTERNAL;
            t.external_data = vec![
                entry("location", &data_name),
                entry("offset", &offset.to_string()),
                entry("length", &data.len().to_string()),
            ];
            offset += data.len() as u64;
        }
        total += offset;
    }
    let encoded_len = model.encoded_len();
    if encoded_len > PROTOBUF_LIMIT {
        bail!(
            "'{}': the model is {encoded_len} bytes without external data, over protobuf's 2 GiB limit; save with \
             external data (a lower external threshold)",
            path.display()
        );
    }
    let mut out = AtomicFile::create(path)?;
    out.write_all(&model.encode_to_vec())
        .with_context(|| format!("writing '{}' failed", path.display()))?;
    total += encoded_len as u64;
    if let Some(f) = data_file {
        f.commit()?;
    }
    out.commit()?;
    Ok(total)
}

fn entry(key: &str, value: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: key.to_string(),
        value: value.to_string(),
    }
}

/// Commits a streaming builder's external data, then writes the model that refers to it.
pub fn save_streamed(
    model: ModelProto,
    sink: Option<super::builder::ExternalSink>,
    out: &std::path::Path,
) -> Result<()> {
    if let Some(s) = sink {
        s.commit()?;
    }
    let opts = SaveOptions {
        external_threshold: None,
    };
    save(model, out, &opts)?;
    Ok(())
}
