//! OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) read field by field: every field the OpenAI
//! API defines is honoured, accepted and ignored (when it cannot change the answer: `user`, `metadata`, `store`,
//! ...) or refused with a message saying what to do instead; any other field is refused by name, so a typo does not
//! pass silently. A few llama.cpp sampling extensions (`top_k`, `min_p`, `repeat_penalty`, `ignore_eos`) are honoured too.
use crate::pipelines::chat::ChatMessage;
use crate::pipelines::llm::SamplingParams;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// One prompt of a request.
#[derive(Debug, Clone)]
pub enum PromptInput {
    /// Text, tokenized with BOS when the model wants one.
    Text(String),
    /// Token ids, used as given.
    Ids(Vec<u32>),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
}

/// A request as the worker runs it.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub prompts: Vec<PromptInput>,
    pub n: usize,
    pub params: SamplingParams,
    /// None: up to the end of the context.
    pub max_tokens: Option<usize>,
    /// Some(k): report each token's log-probability and the k most likely alternatives.
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    pub model: Option<String>,
    /// `response_format`: the JSON schema the output must match.
    pub json_schema: Option<Value>,
}

pub const MAX_N: usize = 16;
pub const MAX_PROMPTS: usize = 16;
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The fields of a JSON object, taken one by one.
struct Fields(Map<String, Value>);

impl Fields {
    fn take<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, String> {
        match self.0.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| format!("`{key}`: {e}")),
        }
    }
    fn raw(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key).filter(|v| !v.is_null())
    }
    /// Removes fields that cannot change the answer.
    fn ignore(&mut self, keys: &[&str]) {
        for k in keys {
            self.0.remove(*k);
        }
    }
    fn finish(self, what: &str) -> Result<(), String> {
        match self.0.keys().next() {
            None => Ok(()),
            Some(k) => Err(format!(
                "unknown field `{k}` in a {what} request; see the OpenAI API reference for the fields it takes"
            )),
        }
    }
}

fn object(body: Value) -> Result<Fields, String> {
    match body {
        Value::Object(m) => Ok(Fields(m)),
        _ => Err("the body must be a JSON object".into()),
    }
}

/// Fields both APIs share: sampling, stop strings, n, streaming, model; the OpenAI fields without effect here.
fn common(f: &mut Fields) -> Result<Parsed, String> {
    let mut p = SamplingParams::default();
    if let Some(t) = f.take::<f32>("temperature")? {
        p.temperature = t;
    }
    if let Some(v) = f.take::<f32>("top_p")? {
        p.top_p = v;
    }
    if let Some(v) = f.take::<usize>("top_k")? {
        p.top_k = v;
    }
    if let Some(v) = f.take::<f32>("min_p")? {
        p.min_p = v;
    }
    // llama-server's: generate up to max_tokens past the end token (benchmarks).
    if let Some(v) = f.take::<bool>("ignore_eos")? {
        p.ignore_eos = v;
    }
    let rep = f.take::<f32>("repetition_penalty")?;
    let rep2 = f.take::<f32>("repeat_penalty")?;
    if let Some(v) = rep.or(rep2) {
        p.repetition_penalty = v;
    }
    if let Some(v) = f.take::<f32>("presence_penalty")? {
        p.presence_penalty = v;
    }
    if let Some(v) = f.take::<f32>("frequency_penalty")? {
        p.frequency_penalty = v;
    }
    if let Some(v) = f.take::<i64>("seed")? {
        p.seed = v as u64;
    }
    p.stop = match f.raw("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s],
        Some(v) => serde_json::from_value::<Vec<String>>(v)
            .map_err(|e| format!("`stop`: {e} (a string or a list of strings)"))?,
    };
    if p.stop.len() > 16 {
        return Err("`stop`: at most 16 stop strings".into());
    }
    let n = f.take::<usize>("n")?.unwrap_or(1);
    if !(1..=MAX_N).contains(&n) {
        return Err(format!("`n` must be between 1 and {MAX_N}"));
    }
    let stream = f.take::<bool>("stream")?.unwrap_or(false);
    let mut include_usage = false;
    if let Some(v) = f.raw("stream_options") {
        let mut o = object(v).map_err(|_| "`stream_options` must be an object".to_string())?;
        include_usage = o.take::<bool>("include_usage")?.unwrap_or(false);
        o.ignore(&["include_obfuscation"]);
        o.finish("stream_options")?;
        if !stream {
            return Err("`stream_options` is only allowed with `stream: true`".into());
        }
    }
    let model = f.take::<String>("model")?;
    if let Some(v) = f.raw("logit_bias")
        && !v.as_object().is_some_and(|m| m.is_empty())
    {
        return Err("`logit_bias` is not supported by this server; leave it out".into());
    }
    f.ignore(&[
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
    ]);
    Ok(Parsed {
        prompts: Vec::new(),
        n,
        params: p,
        max_tokens: None,
        logprobs: None,
        stream,
        include_usage,
        model,
        json_schema: None,
    })
}

fn token_ids(v: &[Value]) -> Result<Vec<u32>, String> {
    v.iter()
        .map(|t| {
            t.as_u64()
                .filter(|&i| i <= u32::MAX as u64)
                .map(|i| i as u32)
                .ok_or_else(|| format!("`prompt`: {t} is not a token id (a non-negative integer)"))
        })
        .collect()
}

/// `prompt`: a string, a list of strings, a list of token ids or a list of such lists.
fn prompts(v: Value) -> Result<Vec<PromptInput>, String> {
    let list = match v {
        Value::String(s) => return Ok(vec![PromptInput::Text(s)]),
        Value::Array(a) => a,
        _ => {
            return Err(
                "`prompt`: invalid type; expected a string, a list of strings, a list of token ids or a list of lists of token ids"
                    .into(),
            );
        }
    };
    if list.is_empty() {
        return Err("`prompt` must not be an empty list".into());
    }
    let out = if list.iter().all(|x| x.is_number()) {
        vec![PromptInput::Ids(token_ids(&list)?)]
    } else {
        list.into_iter()
            .map(|x| match x {
                Value::String(s) => Ok(PromptInput::Text(s)),
                Value::Array(a) => Ok(PromptInput::Ids(token_ids(&a)?)),
                other => Err(format!(
                    "`prompt`: {other} is neither a string nor a list of token ids"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    if out.len() > MAX_PROMPTS {
        return Err(format!(
            "`prompt`: at most {MAX_PROMPTS} prompts per request"
        ));
    }
    Ok(out)
}

/// `POST /v1/completions`.
pub fn completion(body: Value) -> Result<Parsed, String> {
    let mut f = object(body)?;
    if f.0.contains_key("messages") {
        return Err("completions take `prompt`, not `messages` (use /v1/chat/completions)".into());
    }
    let prompt = f
        .raw("prompt")
        .ok_or_else(|| "missing field `prompt`".to_string())?;
    let mut p = common(&mut f)?;
    p.prompts = prompts(prompt)?;
    // OpenAI's default for completions.
    p.max_tokens = Some(f.take::<usize>("max_tokens")?.unwrap_or(16));
    if let Some(k) = f.take::<usize>("logprobs")? {
        if k > MAX_TOP_LOGPROBS {
            return Err(format!(
                "`logprobs` must be between 0 and {MAX_TOP_LOGPROBS}"
            ));
        }
        p.logprobs = Some(k);
    }
    if f.take::<bool>("echo")?.unwrap_or(false) {
        return Err("`echo` is not supported; the prompt is not repeated in the answer".into());
    }
    if f.take::<String>("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err("`suffix` (insertion) is not supported; leave it out".into());
    }
    if let Some(b) = f.take::<usize>("best_of")?
        && b != p.n
        && b != 1
    {
        return Err("`best_of` is not supported (only best_of = n); use `n`".into());
    }
    f.finish("completions")?;
    Ok(p)
}

/// One chat message: `content` as a string or a list of text parts.
fn message(i: usize, v: Value) -> Result<ChatMessage, String> {
    let mut f = object(v).map_err(|_| format!("messages[{i}] must be an object"))?;
    let at = |m: String| format!("messages[{i}]: {m}");
    let role = f
        .take::<String>("role")
        .map_err(at)?
        .ok_or_else(|| at("missing field `role`".into()))?;
    if !["system", "developer", "user", "assistant"].contains(&role.as_str()) {
        return Err(at(format!(
            "role `{role}` is not supported (system, developer, user, assistant)"
        )));
    }
    let name = f.take::<String>("name").map_err(at)?;
    if f.raw("tool_calls")
        .is_some_and(|v| !v.as_array().is_some_and(|a| a.is_empty()))
        || f.raw("function_call").is_some()
    {
        return Err(at("tool and function calls are not supported".into()));
    }
    f.ignore(&["refusal", "audio", "annotations"]);
    let content = match f.raw("content") {
        Some(Value::String(s)) => s,
        None if role == "assistant" => String::new(),
        None => {
            return Err(at(
                "missing field `content` (a string or a list of text parts)".into(),
            ));
        }
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, part) in parts.into_iter().enumerate() {
                let mut p =
                    object(part).map_err(|_| at(format!("content[{j}] must be an object")))?;
                let kind = p.take::<String>("type").map_err(at)?.unwrap_or_default();
                if kind != "text" {
                    return Err(at(format!(
                        "content part type `{kind}` is not supported: this model takes text only (parts of type \"text\")"
                    )));
                }
                text.push_str(
                    &p.take::<String>("text")
                        .map_err(at)?
                        .ok_or_else(|| at(format!("content[{j}]: missing field `text`")))?,
                );
                p.ignore(&["cache_control"]);
                p.finish("content part").map_err(at)?;
            }
            text
        }
        Some(_) => {
            return Err(at(
                "`content`: invalid type; expected a string or a list of text parts".into(),
            ));
        }
    };
    f.finish("message").map_err(at)?;
    Ok(ChatMessage {
        // Templates know "system"; OpenAI's newer name for it is "developer".
        role: if role == "developer" {
            "system".into()
        } else {
            role
        },
        content,
        name,
    })
}

/// `POST /v1/chat/completions`.
pub fn chat(body: Value) -> Result<Parsed, String> {
    let mut f = object(body)?;
    if f.0.contains_key("prompt") {
        return Err(
            "chat requests take `messages`, not `prompt` (use /v1/completions for a raw prompt)"
                .into(),
        );
    }
    let messages = match f.raw("messages") {
        None => return Err("missing field `messages`".into()),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(
                "`messages`: invalid type; expected a list of {\"role\": ..., \"content\": ...}"
                    .into(),
            );
        }
    };
    if messages.is_empty() {
        return Err("messages must hold at least one message".into());
    }
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| message(i, m))
        .collect::<Result<Vec<_>, _>>()?;
    let mut p = common(&mut f)?;
    p.prompts = vec![PromptInput::Chat(messages)];
    let mct = f.take::<usize>("max_completion_tokens")?;
    let mt = f.take::<usize>("max_tokens")?;
    p.max_tokens = mct.or(mt);
    let logprobs = f.take::<bool>("logprobs")?.unwrap_or(false);
    let top = f.take::<usize>("top_logprobs")?;
    if let Some(k) = top {
        if !logprobs {
            return Err("`top_logprobs` needs `logprobs: true`".into());
        }
        if k > MAX_TOP_LOGPROBS {
            return Err(format!(
                "`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}"
            ));
        }
    }
    if logprobs {
        p.logprobs = Some(top.unwrap_or(0));
    }
    if let Some(rf) = f.raw("response_format") {
        let kind = rf.get("type").and_then(|t| t.as_str()).unwrap_or("");
        p.json_schema = match kind {
            "text" => None,
            "json_object" => Some(serde_json::json!({"type": "object"})),
            "json_schema" => Some(
                rf.get("json_schema")
                    .and_then(|j| j.get("schema"))
                    .filter(|s| s.is_object() || s.is_boolean())
                    .cloned()
                    .ok_or_else(|| {
                        "`response_format`: json_schema needs `json_schema.schema`, a JSON schema object".to_string()
                    })?,
            ),
            _ => {
                return Err(format!(
                    "`response_format` type `{kind}` is not supported; use \"text\", \"json_object\" or \"json_schema\""
                ));
            }
        };
    }
    let tools = f.raw("tools");
    if tools
        .as_ref()
        .is_some_and(|v| !v.as_array().is_some_and(|a| a.is_empty()))
        || f.raw("functions").is_some()
        || f.raw("function_call").is_some()
    {
        return Err("tool and function calling is not supported by this server; leave out `tools`/`functions`".into());
    }
    if let Some(tc) = f.raw("tool_choice")
        && !matches!(tc.as_str(), Some("none") | Some("auto"))
    {
        return Err("`tool_choice` other than \"none\" or \"auto\" needs tools, which this server does not support".into());
    }
    if let Some(m) = f.raw("modalities")
        && m != serde_json::json!(["text"])
    {
        return Err("`modalities`: this server answers with text only ([\"text\"])".into());
    }
    for key in ["audio", "prediction", "web_search_options"] {
        if f.raw(key).is_some() {
            return Err(format!(
                "`{key}` is not supported by this server; leave it out"
            ));
        }
    }
    f.ignore(&["parallel_tool_calls", "reasoning_effort", "verbosity"]);
    f.finish("chat completions")?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prompts_in_every_form() {
        let p = completion(json!({"prompt": ["a", [1, 2]], "n": 2})).unwrap();
        assert_eq!(p.prompts.len(), 2);
        assert!(matches!(&p.prompts[1], PromptInput::Ids(v) if v == &[1, 2]));
        assert!(matches!(
            &completion(json!({"prompt": [5, 6]})).unwrap().prompts[0],
            PromptInput::Ids(v) if v == &[5, 6]
        ));
        assert!(
            completion(json!({"prompt": [-1]}))
                .unwrap_err()
                .contains("token id")
        );
        assert!(
            completion(json!({"prompt": []}))
                .unwrap_err()
                .contains("empty")
        );
        assert!(
            completion(json!({"prompt": "a", "bogus": 1}))
                .unwrap_err()
                .contains("unknown field `bogus`")
        );
        assert!(completion(json!({"prompt": "a", "user": "u", "logprobs": 2, "stream": true, "stream_options": {"include_usage": true}})).is_ok());
    }

    #[test]
    fn chat_fields() {
        let p = chat(json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_completion_tokens": 7, "logprobs": true, "top_logprobs": 3, "response_format": {"type": "text"}})).unwrap();
        assert_eq!(p.max_tokens, Some(7));
        assert_eq!(p.logprobs, Some(3));
        assert!(matches!(&p.prompts[0], PromptInput::Chat(m) if m[0].content == "ab"));
        let e = chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})).unwrap_err();
        assert!(e.contains("image_url") && e.contains("text only"), "{e}");
        let p = chat(json!({"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_object"}})).unwrap();
        assert_eq!(p.json_schema, Some(json!({"type": "object"})));
        let e = chat(json!({"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "json_schema"}})).unwrap_err();
        assert!(e.contains("json_schema.schema"), "{e}");
        let e = chat(json!({"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "xml"}})).unwrap_err();
        assert!(e.contains("xml"), "{e}");
        let e = chat(json!({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]})).unwrap_err();
        assert!(e.contains("tool"), "{e}");
        assert!(
            chat(json!({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}))
                .is_err()
        );
        assert!(chat(json!({"messages": [{"role": "user", "content": "a"}], "stream_options": {"include_usage": true}})).is_err());
    }
}
