//! A Hugging Face `tokenizer.json` (the file every published Llama-family model ships), read by
//! Hugging Face's own `tokenizers` crate, with the document markers of `tokenizer_config.json`
//! beside it: `bos_token` before each document, `eos_token` after it (one marker when they are the
//! same token, as GPT-2's is, written before each document as llm.c does).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    /// The directory holding tokenizer.json (and tokenizer_config.json, when there is one).
    pub dir: PathBuf,
    pub vocab_size: usize,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

/// Where `path` (a tokenizer.json, or a directory holding one) has its tokenizer.json; None when
/// it has none.
pub fn find_tokenizer_file(path: &Path) -> Option<PathBuf> {
    if path.is_dir() {
        let file = path.join(TOKENIZER_FILE);
        file.is_file().then_some(file)
    } else {
        path.is_file().then(|| path.to_path_buf())
    }
}

impl HfTokenizer {
    /// Loads `path`: a tokenizer.json, or a directory holding one; `flag` names it in errors.
    pub fn load(path: &Path, flag: &str) -> Result<HfTokenizer> {
        let d = path.display();
        let Some(file) = find_tokenizer_file(path) else {
            bail!("{flag} {d}: no such file, and not a directory holding a {TOKENIZER_FILE}");
        };
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| anyhow::anyhow!("{flag} {}: not a Hugging Face tokenizer.json: {e}", file.display()))?;
        let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
        let vocab_size = inner.get_vocab_size(true);
        let (bos, eos) = special_tokens(&inner, &dir, flag)?;
        Ok(HfTokenizer { inner, dir, vocab_size, bos, eos })
    }

    /// Text → ids, without the tokenizer's own special tokens (documents get [`bos`](Self::bos)
    /// and [`eos`](Self::eos) from whoever frames them).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(|e| anyhow::anyhow!("cannot tokenize: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// A document as it goes into a token file: BOS, its ids, EOS (one marker when they are the
    /// same token, before the document).
    pub fn frame(&self, ids: &[u32]) -> Vec<u32> {
        let eos = self.eos.filter(|&e| Some(e) != self.bos);
        self.bos.into_iter().chain(ids.iter().copied()).chain(eos).collect()
    }

    /// How documents are told apart, in words: "<s> (1) before and </s> (2) after each document".
    pub fn describe_separator(&self) -> String {
        let name = |id: u32| format!("{} ({id})", self.inner.id_to_token(id).unwrap_or_default());
        match (self.bos, self.eos.filter(|&e| Some(e) != self.bos)) {
            (Some(b), Some(e)) => format!("{} before and {} after each document", name(b), name(e)),
            (Some(b), None) => format!("{} before each document", name(b)),
            (None, Some(e)) => format!("{} after each document", name(e)),
            (None, None) => "nothing between documents".to_string(),
        }
    }

    /// Ids → text, all at once (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| anyhow::anyhow!("cannot decode: {e}"))
    }

    /// A decoder fed one id at a time that returns the text each completes: a character split
    /// over several ids is held back until it is whole.
    pub fn stream(&self) -> HfStream<'_> {
        HfStream { ids: Vec::new(), shown: 0, tokenizer: self }
    }

    /// Copies tokenizer.json (and tokenizer_config.json) into `dir`, so that a model or token
    /// directory carries the tokenizer its ids mean; each file atomically.
    pub fn copy_into(&self, dir: &Path, flag: &str) -> Result<()> {
        if same_dir(&self.dir, dir) {
            return Ok(());
        }
        for name in [TOKENIZER_FILE, TOKENIZER_CONFIG_FILE] {
            let from = self.dir.join(name);
            if from.exists() {
                let bytes = std::fs::read(&from).with_context(|| format!("{}: cannot read", from.display()))?;
                crate::os::files::write_atomically(&dir.join(name), &bytes)
                    .with_context(|| format!("{flag} {}: cannot write {name}", dir.display()))?;
            }
        }
        Ok(())
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// BOS and EOS: the `bos_token` and `eos_token` of tokenizer_config.json (a string, or an object
/// with "content"), each of which must be in the vocabulary; neither when there is no such file.
fn special_tokens(inner: &tokenizers::Tokenizer, dir: &Path, flag: &str) -> Result<(Option<u32>, Option<u32>)> {
    let path = dir.join(TOKENIZER_CONFIG_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok((None, None)) };
    let name = path.display();
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{flag}: {name}: not valid JSON"))?;
    let token = |key: &str| -> Result<Option<u32>> {
        let content = match json.get(key) {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.as_str(),
            Some(v) => v.get("content").and_then(|c| c.as_str()).with_context(|| {
                format!("{flag}: {name}: {key} must be a string or an object with \"content\", got {v}")
            })?,
        };
        match inner.token_to_id(content) {
            Some(id) => Ok(Some(id)),
            None => bail!("{flag}: {name}: {key} {content:?} is not in the tokenizer's vocabulary"),
        }
    };
    Ok((token("bos_token")?, token("eos_token")?))
}

/// See [`HfTokenizer::stream`]. It decodes the ids since the last complete character again
/// with each new one, as transformers' TextStreamer does, so every decoder (byte-level,
/// Metaspace, WordPiece) spaces and joins pieces exactly as decoding the whole sequence would.
pub struct HfStream<'a> {
    ids: Vec<u32>,
    /// How much of the decoded `ids` has been returned.
    shown: usize,
    tokenizer: &'a HfTokenizer,
}

impl HfStream<'_> {
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        // U+FFFD at the end: a byte-level character cut short, to be completed by later ids.
        let new = match text.get(self.shown..) {
            Some(new) if !text.ends_with('\u{FFFD}') => new.to_string(),
            _ => return Ok(String::new()),
        };
        self.shown = text.len();
        // Keep the context short: restart from the last id once its text is out (decoders
        // treat a sequence's first token differently, e.g. Metaspace drops its leading space,
        // so one id of context is kept).
        if self.ids.len() > 64 {
            let last = *self.ids.last().expect("pushed above");
            self.ids = vec![last];
            self.shown = self.tokenizer.decode(&self.ids)?.len();
        }
        Ok(new)
    }

    /// What is held back at the end (a character never completed), lossily.
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids)?;
        Ok(text.get(self.shown..).unwrap_or_default().to_string())
    }
}
