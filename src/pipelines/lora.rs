//! LoRA in image pipelines, both ways: merged into the checkpoints before export and quantization
//! (`build --lora`), or merged into a built bundle's weights at run time (`generate --lora`: ONNX Runtime re-creates
//! the sessions with the merged initializers, TensorRT refits 16-bit engines), switchable between images.
//!
//! A family plugs in with one [`BookFn`]: for each of its parts (denoiser, text encoders), the [`AddressBook`] of the
//! weights it has (Flux: [`flux_book`]). Everything else here is family-free.
use crate::models::flux as fluxm;
use crate::onnx::{DataType, OnnxFile};
use crate::weights::lora::{
    AddressBook, LoraFile, Part, Piece, Resolved, Update, merged_tensors, resolve,
};
use crate::weights::safetensors_file::{Checkpoint, Tensor};
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Tensor names and shapes of one part's weights.
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// A family's address book of each part, from that part's weights.
pub type BookFn = fn(Part, &Shapes) -> Result<AddressBook>;

/// Flux: the transformer's table (BFL or diffusers names, fused q/k/v), CLIP-L (with or without `text_model.`)
/// and T5 by their own names.
pub fn flux_book(part: Part, shapes: &Shapes) -> Result<AddressBook> {
    let names = || shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice()));
    match part {
        Part::Denoiser => fluxm::lora::address_book(shapes),
        Part::TextEncoder(0) => Ok(AddressBook::from_names(names(), &["text_model."])),
        Part::TextEncoder(1) => Ok(AddressBook::from_names(names(), &[])),
        Part::TextEncoder(n) => bail!(
            "Flux has two text encoders; a LoRA names text encoder {}",
            n + 1
        ),
    }
}

/// Stable Diffusion: the UNet's table (diffusers and CompVis/SGM names, convolutions included), CLIP text encoders
/// by their own names (with or without `text_model.`): `text_encoder` is text encoder 0 (CLIP-L; SD2.x's OpenCLIP-H),
/// `text_encoder_2` text encoder 1 (SDXL's OpenCLIP-bigG).
pub fn sd_book(part: Part, shapes: &Shapes) -> Result<AddressBook> {
    let names = || shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice()));
    // A transformers-layout CLIP under any scope (a single file's `cond_stage_model.transformer.text_model.`, a
    // folder's `text_model.` or none): modules by their names after `text_model.`, with or without it.
    fn clip_book<'a>(names: impl Iterator<Item = (&'a str, &'a [usize])>) -> AddressBook {
        let mut book = AddressBook::default();
        for (name, shape) in names {
            let (Some(module), [rows, _]) = (name.strip_suffix(".weight"), shape) else {
                continue;
            };
            let bare = module.rsplit_once("text_model.").map_or(module, |(_, b)| b);
            let piece = Piece {
                tensor: name.to_string(),
                dst_row: 0,
                src_rows: 0..*rows,
            };
            book.add(bare, vec![piece.clone()]);
            book.add(&format!("text_model.{bare}"), vec![piece]);
        }
        book
    }
    match part {
        Part::Denoiser => crate::models::unet_lora::address_book(shapes),
        Part::TextEncoder(0 | 1) => Ok(clip_book(names())),
        Part::TextEncoder(n) => bail!(
            "Stable Diffusion has at most two text encoders; a LoRA names text encoder {}",
            n + 1
        ),
    }
}

/// The LoRA part of an SD bundle component ("unet", "text_encoder", "text_encoder_2").
pub fn sd_part(component: &str) -> Option<Part> {
    match component {
        "unet" => Some(Part::Denoiser),
        "text_encoder" => Some(Part::TextEncoder(0)),
        "text_encoder_2" => Some(Part::TextEncoder(1)),
        _ => None,
    }
}

pub fn checkpoint_shapes(ck: &Checkpoint) -> Shapes {
    ck.names()
        .filter_map(|n| ck.shape(n).map(|s| (n.to_string(), s.to_vec())))
        .collect()
}

/// Resolves `loras` against the parts' weights (every module must land somewhere).
pub fn resolve_for(
    loras: &[(LoraFile, f32)],
    parts: &[(Part, &Shapes)],
    book: BookFn,
) -> Result<Resolved> {
    let books: Vec<(Part, AddressBook)> = parts
        .iter()
        .map(|(p, s)| Ok((*p, book(*p, s)?)))
        .collect::<Result<_>>()?;
    let refs: Vec<(Part, &AddressBook)> = books.iter().map(|(p, b)| (*p, b)).collect();
    resolve(loras, &refs)
}

/// Build time: the LoRA-merged weights of `part` replace the checkpoint's (in f32, before any quantization).
/// Returns the number of tensors replaced.
pub fn merge_into_checkpoint(ck: &mut Checkpoint, part: Part, lora: &Resolved) -> Result<usize> {
    let Some(updates) = lora.part(part) else {
        return Ok(0);
    };
    let merged = merged_tensors(updates, &|n| ck.get(n), None)?;
    let n = merged.len();
    for t in merged {
        ck.set_override(t)?;
    }
    Ok(n)
}

/// One part's built weights, read from the graph its engine was made from (initializer names are the
/// checkpoint's, so the family's book applies).
struct GraphWeights {
    shapes: Shapes,
    dtypes: HashMap<String, DataType>,
    data: HashMap<String, Bytes>,
    path: PathBuf,
    /// Quantized layers with a LoRA side path: `X.weight` (its [out, in] listed in `shapes` for the book) ->
    /// the side path's rank (its A and B are `X.lora_down`, `X.lora_up`).
    side: HashMap<String, usize>,
}

impl GraphWeights {
    fn load(path: &Path) -> Result<Self> {
        let onnx = OnnxFile::load(path)?;
        let mut data: HashMap<String, Bytes> = onnx.external_weights()?.into_iter().collect();
        let mut shapes = Shapes::new();
        let mut dtypes = HashMap::new();
        for t in onnx.model.graph.iter().flat_map(|g| &g.initializer) {
            let dt = DataType(t.data_type);
            if !matches!(dt, DataType::FLOAT | DataType::FLOAT16 | DataType::BFLOAT16) {
                continue;
            }
            shapes.insert(t.name.clone(), t.dims.iter().map(|&d| d as usize).collect());
            dtypes.insert(t.name.clone(), dt);
            if !data.contains_key(&t.name) {
                if !t.raw_data.is_empty() {
                    data.insert(t.name.clone(), t.raw_data.clone());
                } else if dt == DataType::FLOAT {
                    let v: Vec<u8> = t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect();
                    data.insert(t.name.clone(), Bytes::from(v));
                }
                // 16-bit values in int32_data (no exporter here writes them): `tensor` reports them missing.
            }
        }
        // Side paths: `X.lora_down` [rank, in] and `X.lora_up` [out, rank] beside a quantized `X`.
        let mut found = Vec::new();
        for (name, down) in &shapes {
            let Some(base) = name.strip_suffix(".lora_down") else {
                continue;
            };
            if let (Some(up), [rank, inputs]) = (shapes.get(&format!("{base}.lora_up")), &down[..])
                && up.len() == 2
                && up[1] == *rank
            {
                found.push((format!("{base}.weight"), vec![up[0], *inputs], *rank));
            }
        }
        let mut side = HashMap::new();
        for (weight, shape, rank) in found {
            // A float weight beside it is merged directly.
            if dtypes.contains_key(&weight) {
                continue;
            }
            shapes.insert(weight.clone(), shape);
            side.insert(weight, rank);
        }
        Ok(GraphWeights {
            shapes,
            dtypes,
            data,
            path: path.to_path_buf(),
            side,
        })
    }

    fn tensor(&self, name: &str) -> Result<Tensor> {
        match (
            self.data.get(name),
            self.dtypes.get(name),
            self.shapes.get(name),
        ) {
            (Some(d), Some(t), Some(s)) => Ok(Tensor {
                name: name.to_string(),
                dtype: *t,
                shape: s.clone(),
                data: d.clone(),
                quant: None,
            }),
            _ => bail!(
                "'{}' has no float weight '{name}': rebuild the bundle with this trt-diff",
                self.path.display()
            ),
        }
    }
}

/// Run-time LoRA for a bundle: which tensors the current LoRA set changed, so that the next set restores them.
pub struct RuntimeLora {
    graphs: BTreeMap<Part, PathBuf>,
    loaded: BTreeMap<Part, GraphWeights>,
    book: BookFn,
    applied: BTreeMap<Part, BTreeSet<String>>,
}

impl RuntimeLora {
    /// `graphs`: per part, the ONNX graph holding the weights its engine was built with.
    pub fn new(graphs: BTreeMap<Part, PathBuf>, book: BookFn) -> Self {
        RuntimeLora {
            graphs,
            loaded: BTreeMap::new(),
            book,
            applied: BTreeMap::new(),
        }
    }

    /// The weights each part's engine must take for `loras` (replacing the set applied before): merged tensors in
    /// each weight's own element type, and the built values of tensors the earlier set changed and this one does
    /// not. Parts with nothing to change are absent. Call [`RuntimeLora::commit`] once the engines took them.
    pub fn weights_for(&mut self, loras: &[(LoraFile, f32)]) -> Result<PendingWeights> {
        let wanted: BTreeSet<Part> = loras
            .iter()
            .flat_map(|(f, _)| f.modules.iter().map(|m| m.part))
            .chain(self.applied.keys().copied())
            .collect();
        for part in &wanted {
            if self.loaded.contains_key(part) {
                continue;
            }
            let Some(path) = self.graphs.get(part) else {
                bail!(
                    "a LoRA has {part} modules and this bundle has no built graph of that part (a LoRA for another \
                     model family, or a bundle whose ONNX graphs are missing: rebuild it)"
                );
            };
            let g = GraphWeights::load(path)
                .with_context(|| format!("reading the built weights of the {part}"))?;
            self.loaded.insert(*part, g);
        }
        let parts: Vec<(Part, &Shapes)> = wanted
            .iter()
            .map(|p| (*p, &self.loaded[p].shapes))
            .collect();
        let resolved = resolve_for(loras, &parts, self.book)?;
        let mut out = BTreeMap::new();
        let mut applied = BTreeMap::new();
        for part in wanted {
            let g = &self.loaded[&part];
            let mut tensors = Vec::new();
            let mut changed = BTreeSet::new();
            if let Some(updates) = resolved.part(part) {
                // Each merged tensor is stored in its own weight's element type (what the engine was built with):
                // one parallel merge per element type.
                let mut by_dtype: BTreeMap<i32, BTreeMap<String, Vec<Update>>> = BTreeMap::new();
                for (name, ups) in updates {
                    if let Some(rank) = g.side.get(name) {
                        for t in side_path_weights(g, name, ups, *rank)? {
                            changed.insert(t.name.clone());
                            tensors.push(t);
                        }
                        continue;
                    }
                    let dt = g.dtypes.get(name).map_or(DataType::FLOAT.0, |d| d.0);
                    by_dtype
                        .entry(dt)
                        .or_default()
                        .insert(name.clone(), ups.clone());
                }
                for (dt, group) in by_dtype {
                    for t in merged_tensors(&group, &|n| g.tensor(n), Some(DataType(dt)))? {
                        changed.insert(t.name.clone());
                        tensors.push(t);
                    }
                }
            }
            for name in self.applied.get(&part).into_iter().flatten() {
                if !changed.contains(name) {
                    tensors.push(g.tensor(name)?);
                }
            }
            if !tensors.is_empty() {
                out.insert(part, tensors);
            }
            if !changed.is_empty() {
                applied.insert(part, changed);
            }
        }
        Ok(PendingWeights {
            by_part: out,
            applied,
        })
    }

    /// Records that the engines now hold `w`'s weights.
    pub fn commit(&mut self, w: PendingWeights) {
        self.applied = w.applied;
    }

    /// Records that only the engines of `done` took `w`'s weights (another part's failed): the next set then
    /// restores what each engine really holds.
    pub fn commit_parts(&mut self, w: &PendingWeights, done: &[Part]) {
        for part in done {
            match w.applied.get(part) {
                Some(names) => {
                    self.applied.insert(*part, names.clone());
                }
                None => {
                    self.applied.remove(part);
                }
            }
        }
    }
}

/// Weights to hand to each part's engine ([`RuntimeLora::weights_for`]).
pub struct PendingWeights {
    pub by_part: BTreeMap<Part, Vec<Tensor>>,
    applied: BTreeMap<Part, BTreeSet<String>>,
}

/// The side path's A [rank, in] and B [out, rank] of quantized layer `weight` for `updates`: each LoRA module's
/// low-rank factors take their own rank slots (pieces of one module, e.g. a kohya `qkv` split over fused rows,
/// share them), the strength and alpha/rank scale folded into B, unused slots zero.
fn side_path_weights(
    g: &GraphWeights,
    weight: &str,
    updates: &[Update],
    rank: usize,
) -> Result<Vec<Tensor>> {
    use crate::weights::lora::Delta;
    let base = weight.strip_suffix(".weight").unwrap_or(weight);
    let (down_name, up_name) = (format!("{base}.lora_down"), format!("{base}.lora_up"));
    let [out_f, in_f] = g.shapes[weight][..] else {
        bail!("side path of '{weight}' is not 2-D");
    };
    let mut a = vec![0f32; rank * in_f];
    let mut b = vec![0f32; out_f * rank];
    // Rank slots by (module delta, strength).
    let mut slots: Vec<(usize, u32, usize)> = Vec::new();
    let mut used = 0;
    for u in updates {
        if u.bias.is_some() {
            bail!(
                "LoRA module '{}' changes the bias of '{weight}', a quantized layer: its side path takes low-rank \
                 weight deltas only; merge this LoRA with `build --lora`",
                u.key
            );
        }
        let Some(d) = &u.delta else { continue };
        let Delta::LowRank { up, down, scale } = &**d else {
            bail!(
                "LoRA module '{}' is not a plain low-rank delta (LoHa, LoKr or full), and '{weight}' is quantized \
                 in this engine: its side path takes up @ down factors only; merge this LoRA with `build --lora`",
                u.key
            );
        };
        if down.cols != in_f {
            bail!(
                "LoRA module '{}' takes {} input features; '{weight}' has {in_f}",
                u.key,
                down.cols
            );
        }
        let key = (std::sync::Arc::as_ptr(d) as usize, u.strength.to_bits());
        let start = match slots.iter().find(|(p, s, _)| (*p, *s) == key) {
            Some((_, _, start)) => *start,
            None => {
                let start = used;
                used += down.rows;
                if used > rank {
                    bail!(
                        "the LoRAs need rank {used} or more beside '{weight}', and the engine's side path has rank \
                         {rank}: rebuild with a larger `--lora-rank`, apply fewer LoRAs at once, or merge them with \
                         `build --lora`"
                    );
                }
                a[start * in_f..(start + down.rows) * in_f].copy_from_slice(&down.data);
                slots.push((key.0, key.1, start));
                start
            }
        };
        let s = u.strength * scale;
        for (i, src) in u.src_rows.clone().enumerate() {
            let row = u.dst_row + i;
            if row >= out_f {
                bail!(
                    "LoRA module '{}' lands past the {out_f} rows of '{weight}'",
                    u.key
                );
            }
            for j in 0..down.rows {
                b[row * rank + start + j] += s * up.data[src * up.cols + j];
            }
        }
    }
    let dt = |n: &str| g.dtypes.get(n).copied().unwrap_or(DataType::FLOAT);
    Ok(vec![
        crate::weights::lora::tensor_of(&down_name, &[rank, in_f], &a, dt(&down_name)),
        crate::weights::lora::tensor_of(&up_name, &[out_f, rank], &b, dt(&up_name)),
    ])
}

/// Per LoRA part, the ONNX graph holding the weights its bundle component's engine was built with (`components`:
/// component name and part): TensorRT refits with the plan's own graph's element types, ONNX Runtime runs the
/// component's ONNX. A graph that cannot be found only matters once a LoRA is applied (then its part is reported).
pub fn bundle_graphs(
    engine: &crate::manifest::EngineFile,
    bundle: &crate::manifest::ImageBundle,
    backend: super::engines::Backend,
    components: &[(&str, Part)],
) -> BTreeMap<Part, PathBuf> {
    use crate::manifest::EngineFile;
    let mut out = BTreeMap::new();
    for (name, part) in components {
        let Some(c) = bundle.components.get(*name) else {
            continue;
        };
        let graph = match (&c.plan, backend) {
            (Some(plan), super::engines::Backend::Trt) => engine
                .file(plan, &format!("component {name}"))
                .and_then(|p| EngineFile::open_with(&p, engine.allow_external))
                .and_then(|f| f.source_onnx()),
            _ => engine.file(&c.onnx, &format!("component {name}")),
        };
        match graph {
            Ok(g) => {
                out.insert(*part, g);
            }
            Err(e) => tracing::debug!("no graph of the {name} for run-time LoRA: {e:#}"),
        }
    }
    out
}

/// Run-time LoRA on a family's engines: `weights_for` the set, each part's engine takes its weights
/// (`set_weights`: the part's engine's `Engine::set_weights`), and what was taken is recorded (also when one part
/// fails, so the next set restores what each engine holds).
pub fn apply_runtime(
    lora: &mut RuntimeLora,
    loras: &[(LoraFile, f32)],
    set_weights: &mut dyn FnMut(Part, &[Tensor]) -> Result<()>,
) -> Result<()> {
    let pending = lora.weights_for(loras)?;
    let mut done = Vec::new();
    for (part, weights) in &pending.by_part {
        let res = set_weights(*part, weights);
        if let Err(e) = res {
            lora.commit_parts(&pending, &done);
            return Err(e.context(format!("applying the LoRAs to the {part}")));
        }
        done.push(*part);
        tracing::info!("LoRA: {} weights of the {part} replaced", weights.len());
    }
    lora.commit(pending);
    Ok(())
}
