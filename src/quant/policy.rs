//! Which precision each layer gets: an ordered rule table (glob on the layer name + layer kind), first match
//! wins, with ModelOpt-like defaults: embeddings, norms, and the first and last projections of the known model
//! families stay in high precision; everything else that is a linear layer takes the target precision.
use super::LinearPrecision;
use anyhow::{Result, bail};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Linear,
    Conv,
    Embedding,
    Norm,
    Attention,
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Keep the model's own (high) precision.
    Keep,
    /// Use the policy's target precision.
    Quantize,
    /// Use this precision.
    Use(LinearPrecision),
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub pattern: glob::Pattern,
    /// None matches every kind.
    pub kind: Option<LayerKind>,
    pub action: Action,
}

impl Rule {
    pub fn new(pattern: &str, kind: Option<LayerKind>, action: Action) -> Result<Self> {
        match glob::Pattern::new(pattern) {
            Ok(p) => Ok(Rule {
                pattern: p,
                kind,
                action,
            }),
            Err(e) => bail!("layer pattern '{pattern}' is not a valid glob: {e}"),
        }
    }

    fn matches(&self, name: &str, kind: LayerKind) -> bool {
        self.kind.is_none_or(|k| k == kind) && self.pattern.matches(name)
    }
}

/// Name patterns kept in high precision by default: the in/out projections of Flux (BFL and diffusers names),
/// SD/SDXL UNets and VAEs, SD3's MMDiT, and LLM heads (as NVIDIA's ModelOpt recipes and demos do).
const KEEP_PATTERNS: &[&str] = &[
    "*embed*",
    "*norm*",
    "*lm_head*",
    "*img_in*",
    "*txt_in*",
    "*time_in*",
    "*vector_in*",
    "*guidance_in*",
    "*final_layer*",
    "*proj_out*",
    "*norm_out*",
    "*conv_in*",
    "*conv_out*",
    "*context_embedder*",
    "*x_embedder*",
    "*pos_embed*",
];

#[derive(Clone, Debug)]
pub struct Policy {
    pub target: LinearPrecision,
    /// Only linear layers (and attention, with `quantize_attention`) are quantized when no rule matches.
    pub quantize_attention: bool,
    rules: Vec<Rule>,
}

impl Policy {
    /// Every linear layer at `target`, no exceptions.
    pub fn uniform(target: LinearPrecision) -> Self {
        Policy {
            target,
            quantize_attention: false,
            rules: Vec::new(),
        }
    }

    /// Exactly `rules` (first match wins), `target` for the opset and domains the graph needs.
    pub fn from_rules(target: LinearPrecision, rules: Vec<Rule>) -> Self {
        Policy {
            target,
            quantize_attention: false,
            rules,
        }
    }

    /// ModelOpt-like defaults for `target`.
    pub fn defaults(target: LinearPrecision) -> Self {
        let mut rules = vec![
            Rule::new("*", Some(LayerKind::Embedding), Action::Keep).expect("valid glob"),
            Rule::new("*", Some(LayerKind::Norm), Action::Keep).expect("valid glob"),
        ];
        rules.extend(
            KEEP_PATTERNS
                .iter()
                .map(|p| Rule::new(p, None, Action::Keep).expect("valid glob")),
        );
        Policy {
            target,
            quantize_attention: false,
            rules,
        }
    }

    /// User rules go first: `--exclude GLOB` keeps matching layers high, `--include GLOB` quantizes them even where
    /// a default would keep them.
    pub fn with_overrides(mut self, include: &[String], exclude: &[String]) -> Result<Self> {
        let mut first = Vec::new();
        for p in exclude {
            first.push(Rule::new(p, None, Action::Keep)?);
        }
        for p in include {
            first.push(Rule::new(p, None, Action::Quantize)?);
        }
        first.append(&mut self.rules);
        self.rules = first;
        Ok(self)
    }

    /// The precision for a layer, or None to keep the model's own precision.
    pub fn decide(&self, name: &str, kind: LayerKind) -> Option<LinearPrecision> {
        let action = self
            .rules
            .iter()
            .find(|r| r.matches(name, kind))
            .map(|r| r.action)
            .unwrap_or(match kind {
                LayerKind::Linear => Action::Quantize,
                LayerKind::Attention if self.quantize_attention => Action::Quantize,
                _ => Action::Keep,
            });
        match action {
            Action::Keep => None,
            Action::Quantize => Some(self.target),
            Action::Use(p) => Some(p),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LayerKind::*;

    #[test]
    fn defaults_keep_embeddings_norms_and_io_projections() {
        let p = Policy::defaults(LinearPrecision::Nvfp4);
        assert_eq!(
            p.decide("double_blocks.0.img_attn.qkv", Linear),
            Some(LinearPrecision::Nvfp4)
        );
        assert_eq!(
            p.decide("transformer_blocks.3.ff.net.0.proj", Linear),
            Some(LinearPrecision::Nvfp4)
        );
        for keep in [
            "img_in",
            "txt_in",
            "final_layer.linear",
            "time_in.in_layer",
            "lm_head",
            "proj_out",
            "model.embed_tokens",
        ] {
            assert_eq!(p.decide(keep, Linear), None, "{keep}");
        }
        assert_eq!(p.decide("layers.0.input_layernorm", Norm), None);
        assert_eq!(p.decide("blocks.0.attn", Attention), None);
        assert_eq!(p.decide("blocks.0.conv1", Conv), None);
    }

    #[test]
    fn user_rules_come_first() {
        let p = Policy::defaults(LinearPrecision::Fp8)
            .with_overrides(&["proj_out".into()], &["*.attn.*".into()])
            .unwrap();
        assert_eq!(p.decide("proj_out", Linear), Some(LinearPrecision::Fp8));
        assert_eq!(p.decide("blocks.1.attn.to_q", Linear), None);
        assert_eq!(
            p.decide("blocks.1.mlp.fc1", Linear),
            Some(LinearPrecision::Fp8)
        );
        assert!(
            Policy::uniform(LinearPrecision::Fp8)
                .with_overrides(&["[".into()], &[])
                .is_err()
        );
        let mut q = Policy::uniform(LinearPrecision::Fp8);
        q.quantize_attention = true;
        assert_eq!(q.decide("anything", Attention), Some(LinearPrecision::Fp8));
    }
}
