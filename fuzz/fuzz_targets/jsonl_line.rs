//! `finch tokenize` JSONL input: each line through `tokenize::parse_jsonl_line`, and the text it
//! yields through the GPT-2 encoder, which must equal tiktoken's and not depend on chunking.
#![no_main]

use finch::cli::tokenize::parse_jsonl_line;
use finch::formats::tokenizer::{gpt2_chunks, Gpt2};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&knobs, rest)) = input.split_first() else { return };
    let field = if knobs & 0x80 == 0 { "text" } else { "" };
    for (i, line) in rest.split(|&b| b == b'\n').enumerate() {
        // As the reader hands lines over: no line ending, no byte-order mark on line 1.
        let mut line = line.strip_suffix(b"\r").unwrap_or(line);
        if i == 0 {
            line = line.strip_prefix(b"\xef\xbb\xbf").unwrap_or(line);
        }
        let at = format!("fuzz.jsonl:{}", i + 1);
        match parse_jsonl_line(line, &at, field) {
            Ok(text) => {
                let tokens = Gpt2::get().encode(&text);
                // tiktoken-rs itself panics (fancy-regex's backtracking stack) on long whitespace
                // runs before other text, which finch's own splitting never hands it.
                if text.len() <= 10_000 {
                    assert_eq!(tokens, tiktoken_rs::r50k_base_singleton().encode_ordinary(&text), "{text:?}");
                }
                let target = (knobs & 0x3f) as usize;
                let chunked: Vec<u32> = gpt2_chunks(&text, target).iter().flat_map(|c| Gpt2::get().encode(c)).collect();
                assert_eq!(chunked, tokens, "{text:?} in chunks of {target}");
            }
            Err(msg) => assert!(msg.starts_with(&at) && !msg.contains('\n'), "{msg}"),
        }
    }
});
