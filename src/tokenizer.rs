//! The two tokenizers finch knows, both built in (no files, no network): GPT-2's byte-level BPE
//! (the tiktoken-rs crate embeds its vocabulary) and raw bytes.

use serde::{Deserialize, Serialize};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tokenizer {
    /// GPT-2 BPE, vocabulary 50257, <|endoftext|> = 50256
    Gpt2,
    /// One token per byte, vocabulary 256
    Bytes,
}

/// GPT-2's <|endoftext|>, which llm.c puts before every document.
pub const GPT2_EOT: u32 = 50256;

impl Tokenizer {
    pub fn vocab_size(self) -> usize {
        match self {
            Tokenizer::Gpt2 => 50257,
            Tokenizer::Bytes => 256,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tokenizer::Gpt2 => "gpt2",
            Tokenizer::Bytes => "bytes",
        }
    }

    /// The tokenizer a model of this vocabulary size was most likely trained with: 256 → bytes,
    /// GPT-2's 50257 → gpt2.
    pub fn guess_from_vocab(vocab_size: usize) -> Option<Tokenizer> {
        match vocab_size {
            256 => Some(Tokenizer::Bytes),
            50257 => Some(Tokenizer::Gpt2),
            _ => None,
        }
    }

    /// Text → tokens. Special tokens written in the text are encoded as ordinary text.
    pub fn encode(self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Gpt2 => tiktoken_rs::r50k_base_singleton().encode_ordinary(text),
            Tokenizer::Bytes => text.bytes().map(u32::from).collect(),
        }
    }

    /// Tokens → bytes (a GPT-2 token may hold part of a UTF-8 character). Ids outside the
    /// vocabulary decode to nothing.
    pub fn decode_bytes(self, tokens: &[u32]) -> Vec<u8> {
        match self {
            Tokenizer::Gpt2 => {
                let bpe = tiktoken_rs::r50k_base_singleton();
                tokens.iter().flat_map(|&t| bpe.decode_bytes(&[t]).unwrap_or_default()).collect()
            }
            Tokenizer::Bytes => tokens.iter().filter(|&&t| t < 256).map(|&t| t as u8).collect(),
        }
    }

    /// The token that separates documents, where there is one.
    pub fn end_of_text(self) -> Option<u32> {
        match self {
            Tokenizer::Gpt2 => Some(GPT2_EOT),
            Tokenizer::Bytes => None,
        }
    }
}

/// Turns a stream of token bytes into text as soon as it is valid UTF-8, holding back the
/// start of a character split across tokens.
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Appends bytes; returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An invalid sequence that is not just cut short can never become valid: emit it
            // (lossily) rather than hold it forever.
            Err(e) if e.error_len().is_some() => self.pending.len(),
            Err(e) => e.valid_up_to(),
        };
        let text = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        text
    }

    /// Whatever is left, lossily.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_round_trips_and_bytes_are_bytes() {
        let text = "Hello world — naïve café\n";
        for tok in [Tokenizer::Gpt2, Tokenizer::Bytes] {
            let ids = tok.encode(text);
            assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
            assert_eq!(tok.decode_bytes(&ids), text.as_bytes());
        }
        assert_eq!(Tokenizer::Bytes.encode("AB"), [65, 66]);
        // Special-token text is not turned into the special token.
        assert!(!Tokenizer::Gpt2.encode("<|endoftext|>").contains(&GPT2_EOT));
    }

    #[test]
    fn utf8_stream_holds_back_split_characters() {
        let mut s = Utf8Stream::default();
        let bytes = "é!".as_bytes();
        assert_eq!(s.push(&bytes[..1]), "");
        assert_eq!(s.push(&bytes[1..]), "é!");
        assert_eq!(s.push(&[0xff, b'a']), "\u{fffd}a");
        assert_eq!(s.push(&[0xe2, 0x82]), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }
}
