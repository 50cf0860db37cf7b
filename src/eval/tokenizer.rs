//! The tokenizer, built from the GGUF's own metadata (no `tokenizer.json` needed).
//!
//! SmolLM2's GGUF says `tokenizer.ggml.model = "gpt2"` (byte-level BPE) and `tokenizer.ggml.pre = "smollm"`
//! (llama.cpp's pre-tokenizer: every digit on its own, then the GPT-2 regex). We write the equivalent Hugging Face
//! `tokenizer.json` in memory — `Sequence[Digits(individual_digits), ByteLevel(no prefix space, regex)]`, BPE
//! without byte fallback or unknown token, a ByteLevel decoder, the control tokens (`token_type == 3`) as special
//! added tokens — and load it with the `tokenizers` crate. No BOS is added (`add_bos_token = false`).

use crate::Error;
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{json, Map};

/// GGUF `token_type` of a control token.
const CONTROL: i32 = 3;

fn meta<'a>(c: &'a Content, key: &str) -> Result<&'a Value, String> {
    c.metadata.get(key).ok_or_else(|| format!("GGUF metadata has no `{key}`"))
}

fn strings(c: &Content, key: &str) -> Result<Vec<String>, String> {
    let list = meta(c, key)?.to_vec().map_err(|e| format!("{key}: {e}"))?;
    list.iter().map(|v| v.to_string().cloned().map_err(|e| format!("{key}: {e}"))).collect()
}

/// The Hugging Face `tokenizer.json` equivalent to the GGUF's tokenizer metadata.
pub fn tokenizer_json(c: &Content) -> Result<String, Error> {
    tokenizer_json_str(c).map_err(Error::Model)
}

fn tokenizer_json_str(c: &Content) -> Result<String, String> {
    let model = meta(c, "tokenizer.ggml.model")?.to_string().map_err(|e| e.to_string())?;
    if model != "gpt2" {
        return Err(format!("tokenizer.ggml.model is `{model}`; only byte-level BPE (`gpt2`) is supported"));
    }
    let tokens = strings(c, "tokenizer.ggml.tokens")?;
    let merges = strings(c, "tokenizer.ggml.merges")?;
    let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v.to_vec().map_err(|e| e.to_string())?.iter().map(|t| t.to_i32().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        vocab.insert(tok.clone(), json!(id));
        if types.get(id) == Some(&CONTROL) {
            added.push(json!({"id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
        }
    }
    let doc = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}
        ]},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    Ok(doc.to_string())
}

/// A loaded tokenizer.
pub struct Tokenizer(tokenizers::Tokenizer);

impl Tokenizer {
    /// From the GGUF metadata.
    pub fn from_gguf(c: &Content) -> Result<Self, Error> {
        Self::from_gguf_str(c).map_err(Error::Model)
    }

    fn from_gguf_str(c: &Content) -> Result<Self, String> {
        let text = tokenizer_json_str(c)?;
        tokenizers::Tokenizer::from_bytes(text.as_bytes()).map(Tokenizer).map_err(|e| format!("tokenizer: {e}"))
    }
    /// Token ids of `text` (no BOS, special tokens not parsed).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, Error> {
        self.encode_str(text).map_err(Error::Model)
    }

    fn encode_str(&self, text: &str) -> Result<Vec<u32>, String> {
        Ok(self.0.encode_fast(text, false).map_err(|e| format!("tokenizer: {e}"))?.get_ids().to_vec())
    }
    /// The text of `ids`.
    pub fn decode(&self, ids: &[u32]) -> Result<String, Error> {
        self.decode_str(ids).map_err(Error::Model)
    }

    fn decode_str(&self, ids: &[u32]) -> Result<String, String> {
        self.0.decode(ids, false).map_err(|e| format!("tokenizer: {e}"))
    }
}
