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

/// The most work one rendering may do (minijinja's fuel, about one unit per instruction): ChatML spends under
/// 100 a message, so conversations of thousands of messages with the wordiest real templates stay far inside.
const RENDER_FUEL: u64 = 10_000_000;

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
    // A template from a model file is untrusted: bound its work (real templates use a few thousand units per
    // message).
    env.set_fuel(Some(RENDER_FUEL));
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
        .map_err(|e| anyhow!("the chat template does not parse: {e}"))?;
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
        minijinja::ErrorKind::OutOfFuel => anyhow!(
            "the chat template did not finish within {RENDER_FUEL} steps: it loops without end or is hostile \
             (use a model file whose tokenizer.chat_template you trust)"
        ),
        _ => anyhow!("rendering the chat template failed: {e}"),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation(n: usize) -> Vec<ChatMessage> {
        (0..n)
            .map(|i| ChatMessage {
                role: if i % 2 == 0 { "user" } else { "assistant" }.into(),
                content: format!("message {i}"),
                name: None,
            })
            .collect()
    }

    /// A template that would loop 10^10 times stops on its budget with a clear error; a long real conversation
    /// stays far inside it.
    #[test]
    fn hostile_templates_run_out_of_fuel_and_real_ones_do_not() {
        let spin =
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let e = render(spin, &conversation(1), "", "", true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not finish"), "{e}");
        let text = render(CHATML, &conversation(2000), "", "", true).unwrap();
        assert!(text.ends_with("<|im_start|>assistant\n"), "{text:.80}");
    }

    /// minijinja's debug rendering of some error spans underflowed (fuzzing found it): errors are shown plainly.
    #[test]
    fn fuzzer_found_template_error_renders_without_panicking() {
        let t = include_str!("../../fuzz/regressions/chat_template/crash-d7a5cadb88c99ba0");
        let _ = render(t, &conversation(3), "", "", true);
    }
}
