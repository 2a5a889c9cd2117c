//! Which tokenizer ids mean: GPT-2's byte-level BPE and raw bytes, both built in (no files, no
//! network; the tiktoken-rs crate embeds GPT-2's vocabulary), or a Hugging Face tokenizer.json
//! that travels with the data and the model (`hf_tokenizer`). `TextTokenizer` is one ready to
//! encode and decode. Also GPT-2's fast encoder for `finch tokenize` (`Gpt2`, `gpt2_encode`): the
//! same ids as tiktoken-rs, faster, and in parallel over chunks of large documents.

use crate::formats::hf_tokenizer::{HfStream, HfTokenizer};
use anyhow::{bail, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tokenizer {
    /// GPT-2 BPE, vocabulary 50257, <|endoftext|> = 50256
    Gpt2,
    /// One token per byte, vocabulary 256
    Bytes,
    /// The Hugging Face tokenizer.json in the directory of the data (meta.json), the model or the
    /// run: named by its path on the command line, recorded as "tokenizer.json"
    #[value(skip)]
    #[serde(rename = "tokenizer.json")]
    HuggingFace,
}

/// GPT-2's <|endoftext|>, which llm.c puts before every document.
pub const GPT2_EOT: u32 = 50256;

impl Tokenizer {
    /// The vocabulary of a built-in tokenizer; None for a tokenizer.json, whose file says.
    pub fn vocab_size(self) -> Option<usize> {
        match self {
            Tokenizer::Gpt2 => Some(50257),
            Tokenizer::Bytes => Some(256),
            Tokenizer::HuggingFace => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Tokenizer::Gpt2 => "gpt2",
            Tokenizer::Bytes => "bytes",
            Tokenizer::HuggingFace => "tokenizer.json",
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

    /// Text → tokens, for the built-in tokenizers (a tokenizer.json is read by [`TextTokenizer`]).
    /// Special tokens written in the text are encoded as ordinary text.
    pub fn encode(self, text: &str) -> Vec<u32> {
        match self {
            Tokenizer::Gpt2 => tiktoken_rs::r50k_base_singleton().encode_ordinary(text),
            Tokenizer::Bytes => text.bytes().map(u32::from).collect(),
            Tokenizer::HuggingFace => unreachable!("a tokenizer.json encodes through TextTokenizer"),
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
            Tokenizer::HuggingFace => unreachable!("a tokenizer.json decodes through TextTokenizer"),
        }
    }

    /// The token that separates documents, where there is one (built-in tokenizers).
    pub fn end_of_text(self) -> Option<u32> {
        match self {
            Tokenizer::Gpt2 => Some(GPT2_EOT),
            Tokenizer::Bytes | Tokenizer::HuggingFace => None,
        }
    }
}

/// A tokenizer ready to use: a built-in one, or a loaded tokenizer.json.
pub enum TextTokenizer {
    Builtin(Tokenizer),
    File(Box<HfTokenizer>),
}

impl TextTokenizer {
    pub fn kind(&self) -> Tokenizer {
        match self {
            TextTokenizer::Builtin(t) => *t,
            TextTokenizer::File(_) => Tokenizer::HuggingFace,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            TextTokenizer::Builtin(t) => t.vocab_size().expect("built-in tokenizers have a fixed vocabulary"),
            TextTokenizer::File(t) => t.vocab_size,
        }
    }

    /// A prompt's ids as a document starts in the training data: after GPT-2's <|endoftext|>
    /// or the tokenizer.json's BOS. An empty prompt with no such token is a newline (bytes), or
    /// the EOS.
    pub fn prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = match self {
            TextTokenizer::Builtin(t) => t.encode(text),
            TextTokenizer::File(t) => t.bos.into_iter().chain(t.encode(text)?).collect(),
        };
        if ids.is_empty() {
            match self {
                TextTokenizer::Builtin(t) => ids.push(t.end_of_text().unwrap_or(b'\n' as u32)),
                TextTokenizer::File(t) => match t.eos {
                    Some(eos) => ids.push(eos),
                    None => bail!("--prompt is empty and the tokenizer has no BOS or EOS token to start from"),
                },
            }
        }
        Ok(ids)
    }

    /// The token that ends a document: generation stops there.
    pub fn stop_token(&self) -> Option<u32> {
        match self {
            TextTokenizer::Builtin(t) => t.end_of_text(),
            TextTokenizer::File(t) => t.eos,
        }
    }

    /// A decoder for ids that arrive one at a time.
    pub fn decoder(&self) -> Decoder<'_> {
        match self {
            TextTokenizer::Builtin(t) => Decoder::Builtin(*t, Utf8Stream::default()),
            TextTokenizer::File(t) => Decoder::File(t.stream()),
        }
    }
}

/// See [`TextTokenizer::decoder`]: the text each id completes.
pub enum Decoder<'a> {
    Builtin(Tokenizer, Utf8Stream),
    File(HfStream<'a>),
}

impl Decoder<'_> {
    pub fn push(&mut self, id: u32) -> Result<String> {
        match self {
            Decoder::Builtin(t, stream) => Ok(stream.push(&t.decode_bytes(&[id]))),
            Decoder::File(stream) => stream.push(id),
        }
    }

    /// Whatever is held back at the end, lossily.
    pub fn finish(&mut self) -> Result<String> {
        match self {
            Decoder::Builtin(_, stream) => Ok(stream.finish()),
            Decoder::File(stream) => stream.finish(),
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

/// Size of the pieces a large document is cut into for parallel encoding.
pub const CHUNK_BYTES: usize = 64 << 10;

/// GPT-2's encoder: tiktoken-rs's vocabulary and merges (its r50k_base is GPT-2's, embedded in
/// the crate), with GPT-2's pre-tokenizer pattern run by the `regex` crate rather than tiktoken's
/// `fancy-regex`: 2–3× faster, and the ids are identical (tests compare them).
pub struct Gpt2 {
    /// tiktoken's pattern without its look-ahead, which `encode` emulates.
    pattern: regex::Regex,
    /// `^\s$`, for the last character of a piece when it is not ASCII.
    space: regex::Regex,
    ranks: rustc_hash::FxHashMap<Vec<u8>, u32>,
    bpe: &'static tiktoken_rs::CoreBPE,
}

/// Pieces this long go to tiktoken-rs whole: its merge is O(n log n) there, `byte_pair_split`'s O(n²).
const LONG_PIECE: usize = 100;

impl Gpt2 {
    /// The shared encoder, built on first use.
    pub fn get() -> &'static Gpt2 {
        static GPT2: std::sync::LazyLock<Gpt2> = std::sync::LazyLock::new(Gpt2::new);
        &GPT2
    }

    fn new() -> Gpt2 {
        let bpe = tiktoken_rs::r50k_base_singleton();
        let ranks =
            (0..GPT2_EOT).map(|id| (bpe.decode_bytes(&[id]).expect("GPT-2 ids below 50256 decode"), id)).collect();
        // tiktoken: '(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s
        let pattern =
            regex::Regex::new(r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+").expect("valid");
        let space = regex::Regex::new(r"^\s$").expect("valid");
        Gpt2 { pattern, space, ranks, bpe }
    }

    /// The tokens of `text` as ordinary text: a literal "<|endoftext|>" in it is not the special
    /// token. Single-threaded; see [`gpt2_encode`] for large texts.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        // Each thread keeps its own clone, whose match cache it owns and keeps warm: with the
        // shared one, every other thread takes a lock for each piece.
        thread_local! {
            static PATTERN: regex::Regex = Gpt2::get().pattern.clone();
        }
        PATTERN.with(|pattern| self.encode_with(pattern, text))
    }

    fn encode_with(&self, pattern: &regex::Regex, text: &str) -> Vec<u32> {
        let mut tokens = Vec::with_capacity(text.len() / 3);
        let mut pos = 0;
        while let Some(m) = pattern.find_at(text, pos) {
            // Every character matches an alternative, so the pieces tile the text.
            debug_assert_eq!(m.start(), pos);
            let mut end = m.end();
            // A whitespace run followed by more text: tiktoken's `\s+(?!\S)` leaves its last
            // character to start the next piece (" word", or a lone "\n").
            if end < text.len() {
                if let Some((last, c)) = m.as_str().char_indices().next_back().filter(|&(i, _)| i > 0) {
                    let is_space =
                        if c.is_ascii() { is_space(c as u8) } else { self.space.is_match(&m.as_str()[last..]) };
                    if is_space {
                        end = pos + last;
                    }
                }
            }
            let piece = &text.as_bytes()[pos..end];
            match self.ranks.get(piece) {
                Some(&id) => tokens.push(id),
                None if piece.len() >= LONG_PIECE => tokens.extend(self.bpe.encode_ordinary(&text[pos..end])),
                None => {
                    tokens.extend(tiktoken_rs::byte_pair_split(piece, &self.ranks).into_iter().map(|p| self.ranks[p]))
                }
            }
            pos = end;
        }
        tokens
    }
}

/// GPT-2 tokens of `text`, encoded as ordinary text (see [`Gpt2::encode`]). Large texts are
/// encoded in parallel chunks, with the same result.
pub fn gpt2_encode(text: &str) -> Vec<u32> {
    let gpt2 = Gpt2::get();
    let chunks: Vec<Vec<u32>> = gpt2_chunks(text, CHUNK_BYTES).par_iter().map(|c| gpt2.encode(c)).collect();
    chunks.concat()
}

/// Regex `\s` in ASCII: Unicode White_Space, which includes the vertical tab.
pub fn is_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

/// Cuts `text` into chunks of about `target` bytes at places where GPT-2's pre-tokenizer splits
/// anyway: before an ASCII whitespace byte that follows an ASCII non-whitespace byte. No match of
/// its pattern spans such a place (letter, number and punctuation runs hold no whitespace except a
/// leading space; whitespace runs hold nothing else), and the pattern looks ahead at most to the
/// next character or the end, never behind. So encoding the chunks one by one gives the tokens
/// of the whole.
pub fn gpt2_chunks(text: &str, target: usize) -> Vec<&str> {
    let b = text.as_bytes();
    let mut chunks = Vec::new();
    let mut start = 0;
    while b.len() - start > target {
        let from = start + target.max(1);
        match (from..b.len()).find(|&p| is_space(b[p]) && b[p - 1].is_ascii() && !is_space(b[p - 1])) {
            Some(p) => {
                chunks.push(&text[start..p]);
                start = p;
            }
            None => break,
        }
    }
    chunks.push(&text[start..]);
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_round_trips_and_bytes_are_bytes() {
        let text = "Hello world — naïve café\n";
        for tok in [Tokenizer::Gpt2, Tokenizer::Bytes] {
            let ids = tok.encode(text);
            assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size().unwrap()));
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

    /// Random texts over pieces that stress GPT-2's pre-tokenizer: spaces before words, runs of
    /// mixed and Unicode whitespace, contractions, digits, punctuation, letters of other scripts,
    /// combining marks, and runs long enough for tiktoken-rs's long-piece path.
    fn random_texts(count: usize, parts: usize) -> Vec<String> {
        let alphabet = [
            "a",
            "b",
            "Z",
            " ",
            "  ",
            "\n",
            "\n\n",
            "\r\n",
            "\t",
            "\x0b",
            "\x0c",
            "'",
            "'s",
            "'ll",
            "'T",
            "7",
            "42",
            "٣",
            "Ⅻ",
            ".",
            "!?",
            "$",
            "é",
            "e\u{301}",
            "日本",
            "ß",
            "\u{a0}",
            "\u{85}",
            "\u{2028}",
            "\u{3000}",
            "\u{200b}",
            "😀",
            "-",
            "<|endoftext|>",
            "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        ];
        let mut s = 12345u64;
        (0..count)
            .map(|_| {
                (0..parts)
                    .map(|_| {
                        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        alphabet[(s >> 33) as usize % alphabet.len()].repeat(if s % 13 == 0 { 40 } else { 1 })
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn encoding_equals_tiktoken_rs() {
        let bpe = tiktoken_rs::r50k_base_singleton();
        for text in random_texts(300, 40) {
            assert_eq!(Gpt2::get().encode(&text), bpe.encode_ordinary(&text), "text {text:?}");
        }
    }

    #[test]
    fn chunked_encoding_equals_whole_encoding() {
        // Cuts only after ASCII non-whitespace: U+3000 is whitespace, so the space after it is no cut.
        assert_eq!(gpt2_chunks("x\u{3000} y z", 1), ["x\u{3000} y", " z"]);
        for text in random_texts(100, 60) {
            let whole = Gpt2::get().encode(&text);
            for target in [1, 2, 3, 5, 8, 50] {
                let chunks = gpt2_chunks(&text, target);
                assert_eq!(chunks.concat(), text);
                let chunked: Vec<u32> = chunks.iter().flat_map(|c| Gpt2::get().encode(c)).collect();
                assert_eq!(chunked, whole, "text {text:?} cut into {chunks:?}");
            }
        }
    }
}
