//! `response_format` (`json_object`, `json_schema`) through constrained decoding with llguidance: at each step
//! only tokens that keep the output a prefix of a document the schema accepts are allowed.
use crate::pipelines::llm::{Constraint, TextTokenizer};
use anyhow::{Result, anyhow};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;

/// The parser factory for one vocabulary (built once, on the first constrained request).
pub struct Grammars {
    factory: ParserFactory,
    vocab_size: usize,
}

impl Grammars {
    pub fn new(tok: &dyn TextTokenizer, vocab_size: usize) -> Result<Self> {
        let eos = tok.eos().ok_or_else(|| {
            anyhow!("the model has no end-of-sequence token, which constrained decoding needs")
        })?;
        let words: Vec<Vec<u8>> = (0..vocab_size as u32)
            .map(|id| {
                let b = tok.piece_bytes(None, id);
                // Control tokens (and tokens without text) are special: a grammar never produces them.
                if id == eos || tok.is_end(id) || Some(id) == tok.bos() || b.is_empty() {
                    let mut s = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    s.extend(format!("<[{id}]>").bytes());
                    s
                } else {
                    b
                }
            })
            .collect();
        let mut info = TokRxInfo::new(vocab_size as u32, eos);
        info.tok_bos = tok.bos();
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| anyhow!("cannot set up constrained decoding: {e}"))?;
        factory.quiet();
        Ok(Grammars {
            factory,
            vocab_size,
        })
    }

    /// A matcher for a JSON schema; the error is a 400 answer's message.
    pub fn json(&self, schema: serde_json::Value) -> Result<JsonConstraint, String> {
        // Compact JSON (", " and ": " between items, no other whitespace): with free whitespace small models
        // can emit newlines until max_tokens. A schema's own `x-guidance` options win.
        let mut schema = match schema {
            serde_json::Value::Bool(true) => serde_json::json!({}),
            s => s,
        };
        if let Some(o) = schema.as_object_mut()
            && !o.contains_key("x-guidance")
        {
            o.insert(
                "x-guidance".into(),
                serde_json::json!({"whitespace_flexible": false, "item_separator": ", ",
                    "key_separator": ": ", "coerce_one_of": true}),
            );
        }
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| format!("`response_format`: the JSON schema cannot be used: {e}"))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(format!(
                "`response_format`: the JSON schema cannot be used: {e}"
            ));
        }
        Ok(JsonConstraint {
            matcher,
            vocab_size: self.vocab_size,
        })
    }
}

pub struct JsonConstraint {
    matcher: Matcher,
    vocab_size: usize,
}

impl Constraint for JsonConstraint {
    fn mask(&mut self, row: &mut [f32]) -> Result<()> {
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| anyhow!("constrained decoding failed: {e}"))?;
        if mask.is_zero() {
            anyhow::bail!("constrained decoding failed: no token can continue the output");
        }
        for (i, v) in row.iter_mut().enumerate().take(self.vocab_size) {
            if !mask.is_allowed(i as u32) {
                *v = f32::NEG_INFINITY;
            }
        }
        for v in row.iter_mut().skip(self.vocab_size) {
            *v = f32::NEG_INFINITY;
        }
        Ok(())
    }

    fn accept(&mut self, token: u32) -> Result<bool> {
        self.matcher
            .consume_token(token)
            .map_err(|e| anyhow!("constrained decoding failed: {e}"))?;
        Ok(self.matcher.is_stopped())
    }
}
