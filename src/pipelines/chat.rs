//! Chat prompts: the model's Jinja chat template (GGUF `tokenizer.chat_template`) rendered with minijinja the way
//! transformers' `apply_chat_template` renders it (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
//! `tojson`, Python string methods); models without a template get ChatML, as llama.cpp's server does.
use anyhow::{Result, anyhow};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// OpenAI clients may name participants; passed to the template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The fallback template (ChatML).
pub const CHATML: &str = "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}";

/// Renders `template` for `messages`, ending with the assistant's turn when `add_generation_prompt`.
pub fn render(
    template: &str,
    messages: &[ChatMessage],
    bos_token: &str,
    eos_token: &str,
    add_generation_prompt: bool,
) -> Result<String> {
    render_with(
        template,
        messages,
        bos_token,
        eos_token,
        add_generation_prompt,
        None,
    )
}

/// As [`render`], with transformers' `enable_thinking` template variable set (Qwen3's templates read it; FLUX.2
/// [klein] formats prompts with `enable_thinking=False`); None leaves it undefined.
pub fn render_with(
    template: &str,
    messages: &[ChatMessage],
    bos_token: &str,
    eos_token: &str,
    add_generation_prompt: bool,
    enable_thinking: Option<bool>,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<minijinja::Value, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_function("strftime_now", |fmt: String| {
        // Templates use it for "Today Date"; a fixed clock keeps prompts reproducible.
        fmt.replace("%d", "01")
            .replace("%b", "Jan")
            .replace("%B", "January")
            .replace("%Y", "2026")
            .replace("%m", "01")
    });
    env.add_filter("tojson", tojson);
    env.add_template("chat", template)
        .map_err(|e| anyhow!("the chat template does not parse: {e:#}"))?;
    let t = env.get_template("chat").map_err(|e| anyhow!("{e}"))?;
    t.render(minijinja::context! {
        messages => messages,
        bos_token => bos_token,
        eos_token => eos_token,
        add_generation_prompt => add_generation_prompt,
        tools => minijinja::Value::from(()),
        enable_thinking => enable_thinking.map_or(minijinja::Value::UNDEFINED, minijinja::Value::from),
    })
    .map_err(|e| match e.kind() {
        minijinja::ErrorKind::InvalidOperation => anyhow!(
            "the chat template refused the messages: {}",
            e.detail().unwrap_or("")
        ),
        _ => anyhow!("rendering the chat template failed: {e:#}"),
    })
}

/// Python's `json.dumps(x, ensure_ascii=False)` (", " and ": " separators, keys in insertion order), as
/// transformers' `tojson` filter writes it.
fn tojson(v: minijinja::Value) -> std::result::Result<String, minijinja::Error> {
    let mut out = String::new();
    py_json(&v, &mut out)?;
    Ok(out)
}

fn py_json(v: &minijinja::Value, out: &mut String) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind as K;
    match v.kind() {
        K::Undefined | K::None => out.push_str("null"),
        K::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        K::Number => out.push_str(&v.to_string()),
        K::String => out.push_str(&serde_json::Value::String(v.to_string()).to_string()),
        K::Seq | K::Iterable => {
            out.push('[');
            for (i, x) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_json(&x, out)?;
            }
            out.push(']');
        }
        K::Map => {
            out.push('{');
            for (i, k) in v.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&serde_json::Value::String(k.to_string()).to_string());
                out.push_str(": ");
                py_json(&v.get_item(&k)?, out)?;
            }
            out.push('}');
        }
        _ => out.push_str(&serde_json::Value::String(v.to_string()).to_string()),
    }
    Ok(())
}
