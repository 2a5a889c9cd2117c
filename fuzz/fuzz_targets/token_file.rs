//! llm.c token files and raw uint16 token files: `formats::tokens::parse_token_file`, which
//! `TokenStream::open` runs on every memory-mapped shard.
#![no_main]

use finch::formats::tokens::{parse_token_file, DataFormat, TokenLayout, LLMC_HEADER_BYTES, LLMC_MAGIC};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else { return };
    let Some((vocab, rest)) = rest.split_first_chunk::<4>() else { return };
    let vocab_size = u32::from_le_bytes(*vocab) as usize;
    let (format, file) = match mode % 3 {
        // Arbitrary bytes, read either way.
        0 => (DataFormat::Llmc, rest.to_vec()),
        1 => (DataFormat::RawU16, rest.to_vec()),
        // A header with the magic and fuzzed version and count (its 12 bytes), then the body.
        _ => {
            let Some((fields, body)) = rest.split_first_chunk::<8>() else { return };
            let mut file = vec![0u8; LLMC_HEADER_BYTES];
            file[..4].copy_from_slice(&LLMC_MAGIC.to_le_bytes());
            file[4..12].copy_from_slice(fields);
            file.extend_from_slice(body);
            (DataFormat::Llmc, file)
        }
    };
    if let Ok(TokenLayout { start, width, len, largest_id }) =
        parse_token_file(&file, Path::new("fuzz.bin"), format, vocab_size)
    {
        assert!(width == 2 || width == 4);
        assert_eq!(start + len * width, file.len());
        let mut largest = 0;
        for t in file[start..].chunks_exact(width) {
            let id = if width == 2 { u16::from_le_bytes([t[0], t[1]]) as u32 } else { u32::from_le_bytes(t.try_into().unwrap()) };
            assert!((id as usize) < vocab_size);
            largest = largest.max(id);
        }
        assert_eq!(largest, largest_id);
    }
});
