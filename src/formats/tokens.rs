//! Token files, memory-mapped: llm.c's format (a 256 × int32 header, then uint16 or uint32
//! tokens) or raw little-endian uint16 (nanoGPT's train.bin). Several shards read as one stream.

use crate::formats::tokenizer::Tokenizer;
use crate::formats::trainlog::human_duration;
use crate::os::mapfile::MappedFile;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `finch tokenize` writes beside its shards, describing them.
pub const META_FILE: &str = "meta.json";

pub const LLMC_MAGIC: i32 = 20240520;
/// llm.c's token files of uint32 tokens (its Llama 3 work: vocabularies above 65,536 ids):
/// magic 20240801, version 7, the same 256-int header.
pub const LLMC_MAGIC_U32: i32 = 20240801;
pub const LLMC_VERSION_U32: i32 = 7;
pub const LLMC_HEADER_BYTES: usize = 256 * 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// llm.c token files: 1024-byte header (magic 20240520, version, count), then tokens.
    Llmc,
    /// Raw little-endian uint16 tokens with no header (nanoGPT's train.bin).
    RawU16,
}

/// One memory-mapped shard.
struct Shard {
    path: PathBuf,
    file: MappedFile,
    /// Byte offset of the first token.
    start: usize,
    /// Bytes per token: 2 or 4.
    width: usize,
    len: usize,
    largest_id: u32,
}

impl Shard {
    fn open(path: &Path, format: DataFormat, vocab_size: usize) -> Result<Shard> {
        let hint = format!("; name the token files in it, e.g. '{}'", path.join("train_*.bin").display());
        let file = MappedFile::open(path, &hint)?;
        if file.is_empty() {
            bail!("{}: the file is empty", path.display());
        }
        let TokenLayout { start, width, len, largest_id } = parse_token_file(&file, path, format, vocab_size)?;
        Ok(Shard { path: path.to_owned(), file, start, width, len, largest_id })
    }

    fn bytes(&self) -> &[u8] {
        &self.file[self.start..self.start + self.len * self.width]
    }

    fn token(&self, i: usize) -> u32 {
        token_at(self.bytes(), self.width, i)
    }
}

/// Token `i` of little-endian tokens `width` (2 or 4) bytes wide.
fn token_at(bytes: &[u8], width: usize, i: usize) -> u32 {
    let b = &bytes[i * width..];
    match width {
        2 => u16::from_le_bytes([b[0], b[1]]) as u32,
        _ => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
    }
}

/// The largest token id of `bytes`, little-endian tokens `width` bytes wide.
fn largest_id(bytes: &[u8], width: usize) -> u32 {
    match width {
        2 => bytes.par_chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).max(),
        _ => bytes.par_chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).max(),
    }
    .unwrap_or(0)
}

/// The first token ≥ `vocab_size` of `bytes`, as (index, id).
fn first_out_of_vocab(bytes: &[u8], width: usize, vocab_size: usize) -> Option<(usize, u32)> {
    let index = match width {
        2 => bytes.par_chunks_exact(2).position_first(|b| u16::from_le_bytes([b[0], b[1]]) as usize >= vocab_size),
        _ => bytes
            .par_chunks_exact(4)
            .position_first(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize >= vocab_size),
    }?;
    Some((index, token_at(bytes, width, index)))
}

/// Checks that every token id of `bytes`, a file laid out as `layout`, is below `vocab_size`, in
/// slices so that `report` (over the whole file) can show the progress of a long check. Returns
/// the largest id.
fn check_token_ids(
    bytes: &[u8],
    path: &Path,
    layout: TokenLayout,
    vocab_size: usize,
    report: &mut ScanReport,
) -> Result<u32> {
    let TokenLayout { start, width, len, .. } = layout;
    let tokens = &bytes[start..start + len * width];
    // About a hundred slices, each a whole number of tokens: fine-grained progress on a slow disk,
    // and large enough that the parallel scan of each costs little to start.
    let slice = (tokens.len() / 100).clamp(1 << 20, 64 << 20) / 4 * 4;
    let mut largest = 0;
    for (i, part) in tokens.chunks(slice).enumerate() {
        // One pass finds the largest id; only a file that fails reads a slice twice.
        largest = largest.max(largest_id(part, width));
        if let Some((index, id)) =
            (largest as usize >= vocab_size).then(|| first_out_of_vocab(part, width, vocab_size)).flatten()
        {
            report.finish(false);
            let index = i * slice / width + index;
            bail!(
                "{}: token {index} (byte offset {}) has id {id}, but the model's vocab size is {vocab_size}",
                path.display(),
                start + index * width
            );
        }
        report.progress(start + i * slice + part.len());
    }
    report.finish(true);
    Ok(largest)
}

/// Shows a long check of a token file: nothing for the first seconds (most files take less),
/// then a bar on a terminal or a line every 10 s in a log; at the end the read rate, with a
/// warning if it is slow.
struct ScanReport {
    name: String,
    total: usize,
    started: Instant,
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
    terminal: bool,
}

/// Checks shorter than this print nothing.
const QUIET_SECONDS: f64 = 2.0;
/// Seconds between progress lines when the output is not a terminal.
const LINE_SECONDS: f64 = 10.0;
/// Reads slower than this (MB/s) get a warning: a network file system or a disk that is failing
/// or shared with heavy work. Local disks, even spinning ones, read well above it.
const SLOW_MB_PER_S: f64 = 50.0;

impl ScanReport {
    fn new(path: &Path, total: usize) -> ScanReport {
        ScanReport {
            name: path.display().to_string(),
            total,
            started: Instant::now(),
            bar: None,
            last_line: None,
            terminal: std::io::stderr().is_terminal(),
        }
    }

    fn progress(&mut self, done: usize) {
        let seconds = self.started.elapsed().as_secs_f64();
        if seconds < QUIET_SECONDS || done >= self.total {
            return;
        }
        if self.terminal {
            let bar = self.bar.get_or_insert_with(|| {
                let bar = ProgressBar::new(self.total as u64);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{bar:30} {decimal_bytes}/{decimal_total_bytes}  {decimal_bytes_per_sec}  {msg}  [{elapsed_precise} < {eta_precise}]",
                    )
                    .expect("valid template"),
                );
                bar.set_message(format!("checking {}", self.name));
                bar
            });
            bar.set_position(done as u64);
        } else if self.last_line.is_none_or(|t| t.elapsed().as_secs_f64() >= LINE_SECONDS) {
            self.last_line = Some(Instant::now());
            let rate = done as f64 / seconds;
            println!(
                "checking {}: {:.1} of {:.1} MB ({:.0}%), {:.1} MB/s, about {} left",
                self.name,
                done as f64 / 1e6,
                self.total as f64 / 1e6,
                100.0 * done as f64 / self.total as f64,
                rate / 1e6,
                human_duration((self.total - done) as f64 / rate)
            );
        }
    }

    /// Ends the report; `complete` if every token was read.
    fn finish(&mut self, complete: bool) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let seconds = self.started.elapsed().as_secs_f64();
        if !complete || seconds < QUIET_SECONDS {
            return;
        }
        let rate = self.total as f64 / seconds / 1e6;
        println!("checked {}: {:.1} MB in {seconds:.1} s, {rate:.1} MB/s", self.name, self.total as f64 / 1e6);
        if rate < SLOW_MB_PER_S {
            eprintln!(
                "warning: {} reads at only {rate:.1} MB/s (a network file system, or a slow or busy disk?); \
                 every start pays this, and training reads it again wherever it is not cached in memory: \
                 a copy on a local disk would be faster",
                self.name
            );
        }
    }
}

/// Where the tokens of a token file lie in its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLayout {
    /// Byte offset of the first token.
    pub start: usize,
    /// Bytes per token: 2 or 4.
    pub width: usize,
    /// Number of tokens.
    pub len: usize,
    /// The largest token id (0 until the ids are checked).
    pub largest_id: u32,
}

/// Checks the bytes of one token file as [`TokenStream::open`] does: the llm.c header (or, for
/// raw uint16, the size) and that every token id is below `vocab_size`. `path` only names the
/// file in errors.
pub fn parse_token_file(bytes: &[u8], path: &Path, format: DataFormat, vocab_size: usize) -> Result<TokenLayout> {
    let mut report = ScanReport::new(path, bytes.len());
    let layout = parse_token_layout(bytes, path, format)?;
    let largest_id = check_token_ids(bytes, path, layout, vocab_size, &mut report)?;
    Ok(TokenLayout { largest_id, ..layout })
}

/// Where the tokens lie in the bytes of a token file: its llm.c header, or for raw uint16 its size.
fn parse_token_layout(bytes: &[u8], path: &Path, format: DataFormat) -> Result<TokenLayout> {
    let name = path.display();
    let size = bytes.len();
    if size == 0 {
        bail!("{name}: the file is empty");
    }
    if let Some(kind) = text_kind(bytes) {
        bail!(
            "{name}: this is {kind}, not tokens; turn it into token files first: finch tokenize {name}{} --out DIR, \
             then train on 'DIR/train_*.bin'",
            if kind == "JSON" { " --field FIELD" } else { "" }
        );
    }
    let (start, width, len) = match format {
        DataFormat::RawU16 => {
            if size % 2 != 0 {
                bail!("{name}: raw uint16 token file has an odd size ({size} bytes); is it truncated?");
            }
            (0, 2, size / 2)
        }
        DataFormat::Llmc => parse_llmc_header(bytes, path)?,
    };
    Ok(TokenLayout { start, width, len, largest_id: 0 })
}

/// "JSON lines" or "text" when the start of a file is clearly that: valid UTF-8 (a character cut at
/// the end of the sample aside) with no NUL byte and no control character but tab, CR, LF and FF,
/// and with whitespace in it. Token files never are: any id below 256 puts a NUL byte in a uint16
/// file, GPT-2's <|endoftext|> (50256) is not UTF-8, and an llm.c header holds NULs.
pub fn text_kind(bytes: &[u8]) -> Option<&'static str> {
    let sample = &bytes[..bytes.len().min(64 << 10)];
    let text = match std::str::from_utf8(sample) {
        Ok(text) => text,
        // A character cut by the end of the sample is still text.
        Err(e) if e.error_len().is_none() && sample.len() - e.valid_up_to() < 4 => {
            std::str::from_utf8(&sample[..e.valid_up_to()]).ok()?
        }
        Err(_) => return None,
    };
    let controls = text.chars().any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r' | '\x0c'));
    if text.is_empty() || controls || !text.contains([' ', '\n']) {
        return None;
    }
    Some(if text.trim_start().starts_with(['{', '[']) { "JSON" } else { "text" })
}

/// Validates an llm.c header; returns (first token byte, bytes per token, token count).
fn parse_llmc_header(bytes: &[u8], path: &Path) -> Result<(usize, usize, usize)> {
    let name = path.display();
    let int = |i: usize| i32::from_le_bytes(bytes[i * 4..i * 4 + 4].try_into().unwrap());
    if bytes.len() < 4 || ![LLMC_MAGIC, LLMC_MAGIC_U32].contains(&int(0)) {
        bail!(
            "{name}: not an llm.c token file (it does not start with magic {LLMC_MAGIC} or {LLMC_MAGIC_U32}); \
             if it holds raw uint16 tokens (nanoGPT's train.bin), pass --data-format raw-u16"
        );
    }
    if bytes.len() < LLMC_HEADER_BYTES {
        bail!("{name}: truncated: {} bytes, shorter than the {LLMC_HEADER_BYTES}-byte llm.c header", bytes.len());
    }
    let width = match (int(0), int(1)) {
        (LLMC_MAGIC, 1) => 2,
        (LLMC_MAGIC, 2) => 4, // finch's earlier uint32 files
        (LLMC_MAGIC_U32, LLMC_VERSION_U32) => 4,
        (LLMC_MAGIC_U32, v) => bail!(
            "{name}: unsupported llm.c token file version {v} for magic {LLMC_MAGIC_U32} (expected {LLMC_VERSION_U32}: \
             uint32 tokens)"
        ),
        (_, v) => {
            bail!("{name}: unsupported llm.c token file version {v} (expected 1 for uint16 or 2 for uint32 tokens)")
        }
    };
    let count = int(2);
    if count < 0 {
        bail!("{name}: header gives a negative token count ({count})");
    }
    let count = count as usize;
    let expected = LLMC_HEADER_BYTES + count * width;
    if bytes.len() < expected {
        bail!(
            "{name}: truncated: header says {count} tokens ({expected} bytes) but the file has {} bytes",
            bytes.len()
        );
    }
    if bytes.len() > expected {
        bail!(
            "{name}: header/size mismatch: header says {count} tokens ({expected} bytes) but the file has {} bytes",
            bytes.len()
        );
    }
    if count == 0 {
        bail!("{name}: the file holds no tokens");
    }
    Ok((LLMC_HEADER_BYTES, width, count))
}

/// Expands `--data`: a path, or a glob pattern (`dir/train_*.bin`) taken in sorted order.
pub fn expand_paths(pattern: &str, flag: &str) -> Result<Vec<PathBuf>> {
    if !pattern.contains(['*', '?', '[']) {
        return Ok(vec![PathBuf::from(pattern)]);
    }
    let mut paths: Vec<PathBuf> = glob::glob(pattern)
        .with_context(|| format!("{flag} {pattern}: invalid glob pattern"))?
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("{flag} {pattern}: cannot list the matching files"))?;
    if paths.is_empty() {
        bail!("{flag} {pattern}: no file matches the pattern");
    }
    paths.sort();
    Ok(paths)
}

/// The concatenation of one or more shards, read as one stream of token ids.
pub struct TokenStream {
    shards: Vec<Shard>,
    /// Index in the stream of each shard's first token.
    starts: Vec<usize>,
    len: usize,
}

impl TokenStream {
    /// Opens every shard matching `pattern` and checks every token id is below `vocab_size`.
    pub fn open(pattern: &str, flag: &str, format: DataFormat, vocab_size: usize) -> Result<TokenStream> {
        let mut shards = Vec::new();
        for path in expand_paths(pattern, flag)? {
            shards.push(Shard::open(&path, format, vocab_size)?);
        }
        Ok(Self::from_shards(shards))
    }

    fn from_shards(shards: Vec<Shard>) -> TokenStream {
        let mut starts = Vec::with_capacity(shards.len());
        let mut len = 0;
        for s in &shards {
            starts.push(len);
            len += s.len;
        }
        TokenStream { shards, starts, len }
    }

    /// An in-memory stream (tests, generated corpora).
    pub fn from_tokens(tokens: &[u32]) -> TokenStream {
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        let shard = Shard {
            path: PathBuf::from("<memory>"),
            file: MappedFile::from_bytes(&bytes),
            start: 0,
            width: 4,
            len: tokens.len(),
            largest_id: tokens.iter().copied().max().unwrap_or(0),
        };
        Self::from_shards(vec![shard])
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The largest token id in the stream.
    pub fn largest_id(&self) -> u32 {
        self.shards.iter().map(|s| s.largest_id).max().unwrap_or(0)
    }

    /// The paths of the shards, in stream order.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    pub fn describe(&self) -> String {
        match self.shards.as_slice() {
            [one] => one.path.display().to_string(),
            many => {
                format!("{} shards ({} .. {})", many.len(), many[0].path.display(), many[many.len() - 1].path.display())
            }
        }
    }

    /// Copies tokens `start .. start + out.len()` of the stream, crossing shard boundaries.
    pub fn read(&self, start: usize, out: &mut [u32]) {
        assert!(start + out.len() <= self.len, "read past the end of the token stream");
        let mut shard = self.starts.partition_point(|&s| s <= start) - 1;
        let mut pos = start - self.starts[shard];
        for o in out.iter_mut() {
            while pos == self.shards[shard].len {
                shard += 1;
                pos = 0;
            }
            *o = self.shards[shard].token(pos);
            pos += 1;
        }
    }
}

/// Walks a stream in windows of B·T + 1 tokens (inputs and next-token targets), advancing B·T
/// each time and wrapping to offset 0 when a window would run past the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchWalker {
    /// Offset of the next window.
    pub position: usize,
}

impl BatchWalker {
    /// Fills `x` and `y` (B·T each) with the next batch: x[i] = buf[i], y[i] = buf[i + 1].
    pub fn next_batch(&mut self, stream: &TokenStream, buf: &mut Vec<u32>, x: &mut [u32], y: &mut [u32]) {
        self.next_batch_of(stream, buf, x, y, (0, 1));
    }

    /// Data parallel: rank `rank` of `ranks` takes the rank-th of every `ranks` consecutive
    /// windows of B·T tokens, so the ranks together read exactly what one process at batch
    /// ranks × B reads (and wrap to the start at the same place); `position` moves by all of them.
    pub fn next_batch_of(
        &mut self,
        stream: &TokenStream,
        buf: &mut Vec<u32>,
        x: &mut [u32],
        y: &mut [u32],
        (rank, ranks): (usize, usize),
    ) {
        let n = x.len();
        assert!(n * ranks < stream.len(), "the stream is shorter than one batch of every rank");
        if self.position + n * ranks + 1 > stream.len() {
            self.position = 0;
        }
        buf.resize(n + 1, 0);
        stream.read(self.position + rank * n, buf);
        x.copy_from_slice(&buf[..n]);
        y.copy_from_slice(&buf[1..]);
        self.position += n * ranks;
    }
}

/// The part of `finch tokenize`'s meta.json that training and sampling read: which tokenizer
/// made the tokens, and so the vocabulary a model of them needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct DataMeta {
    pub tokenizer: Tokenizer,
    pub vocab_size: usize,
}

/// The meta.json in the directory of `token_file`, if `finch tokenize` wrote it, with its path.
/// Another tool's file of that name (without "tokenizer") is none of ours and is ignored; one of
/// ours that does not add up is ignored with a warning.
pub fn read_meta(token_file: &Path) -> Option<(PathBuf, DataMeta)> {
    let path = token_file.parent().unwrap_or(Path::new(".")).join(META_FILE);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
    json.get("tokenizer")?;
    match serde_json::from_value::<DataMeta>(json) {
        Ok(meta) if meta.tokenizer.vocab_size().is_none_or(|v| v == meta.vocab_size) => Some((path, meta)),
        Ok(meta) => {
            eprintln!(
                "warning: {}: vocab_size {} is not the {} tokenizer's {}; ignoring the file",
                path.display(),
                meta.vocab_size,
                meta.tokenizer.name(),
                meta.tokenizer.vocab_size().unwrap_or_default()
            );
            None
        }
        Err(e) => {
            eprintln!("warning: {}: {e}; ignoring it", path.display());
            None
        }
    }
}

/// The 1024-byte header of an llm.c token file of `count` tokens; `version` 1 is uint16, 2 uint32.
pub fn llmc_header(version: i32, count: i32) -> Vec<u8> {
    let mut bytes = vec![0u8; LLMC_HEADER_BYTES];
    for (i, v) in [LLMC_MAGIC, version, count].iter().enumerate() {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    bytes
}

/// The header of llm.c's uint32 token files (magic 20240801, version 7) of `count` tokens.
pub fn llmc_header_u32(count: i32) -> Vec<u8> {
    let mut bytes = llmc_header(LLMC_VERSION_U32, count);
    bytes[..4].copy_from_slice(&LLMC_MAGIC_U32.to_le_bytes());
    bytes
}

/// Writes llm.c's uint32 token file: what a vocabulary above 65,536 ids needs.
pub fn write_llmc_u32(path: &Path, tokens: &[u32]) -> Result<()> {
    let mut bytes = llmc_header_u32(tokens.len() as i32);
    bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    crate::os::files::write_atomically(path, &bytes)
}

/// Writes an llm.c token file (version 1, uint16) — for tests and tools.
pub fn write_llmc_u16(path: &Path, tokens: &[u16]) -> Result<()> {
    let mut bytes = llmc_header(1, tokens.len() as i32);
    bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    crate::os::files::write_atomically(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_advance_by_bt_and_wrap_to_zero() {
        let tokens: Vec<u32> = (0..41).collect();
        let stream = TokenStream::from_tokens(&tokens);
        let mut walker = BatchWalker { position: 0 };
        let (mut buf, mut x, mut y) = (vec![], vec![0; 16], vec![0; 16]);
        let mut starts = vec![];
        for _ in 0..5 {
            walker.next_batch(&stream, &mut buf, &mut x, &mut y);
            starts.push(x[0]);
            assert!(x.iter().zip(&y).all(|(a, b)| b == &(a + 1)));
        }
        // 0..17 and 16..33 fit in 41 tokens; 32..49 would not, so the walk wraps.
        assert_eq!(starts, [0, 16, 0, 16, 0]);
    }

    #[test]
    fn an_id_beyond_the_vocabulary_is_found_at_its_index_in_any_slice_of_the_check() {
        // 3 MB of tokens: the check reads it in 1 MiB slices.
        for (width, bad) in [(2, 1_000_000), (2, 1_499_999), (4, 300_000), (4, 0)] {
            let n = 1_500_000 / (width / 2);
            let mut bytes = llmc_header(width as i32 / 2, n as i32);
            for i in 0..n {
                let id: u32 = if i == bad { 60 } else { 7 };
                bytes.extend_from_slice(&id.to_le_bytes()[..width]);
            }
            let e = parse_token_file(&bytes, Path::new("t.bin"), DataFormat::Llmc, 50).unwrap_err().to_string();
            let offset = LLMC_HEADER_BYTES + bad * width;
            assert_eq!(
                e,
                format!("t.bin: token {bad} (byte offset {offset}) has id 60, but the model's vocab size is 50")
            );
        }
    }

    #[test]
    fn reads_cross_shard_boundaries() {
        let dir = std::env::temp_dir().join(format!("finch-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_llmc_u16(&dir.join("s_000.bin"), &[0, 1, 2]).unwrap();
        write_llmc_u16(&dir.join("s_001.bin"), &[3, 4]).unwrap();
        write_llmc_u16(&dir.join("s_002.bin"), &[5, 6, 7]).unwrap();
        let stream = TokenStream::open(&format!("{}/s_*.bin", dir.display()), "--data", DataFormat::Llmc, 8).unwrap();
        let mut out = vec![0; 6];
        stream.read(1, &mut out);
        assert_eq!(out, [1, 2, 3, 4, 5, 6]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn llmc_s_uint32_files_are_read() {
        let dir = std::env::temp_dir().join(format!("finch-u32-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big.bin");
        let tokens = [70_000u32, 5, 151_000, 65_536];
        write_llmc_u32(&path, &tokens).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], [LLMC_MAGIC_U32.to_le_bytes(), LLMC_VERSION_U32.to_le_bytes()].concat());
        let stream = TokenStream::open(path.to_str().unwrap(), "--data", DataFormat::Llmc, 151_936).unwrap();
        let mut got = vec![0u32; 4];
        stream.read(0, &mut got);
        assert_eq!(got, tokens);
        let open = |vocab| TokenStream::open(path.to_str().unwrap(), "--data", DataFormat::Llmc, vocab).err().unwrap();
        let err = format!("{:#}", open(100_000));
        assert!(err.contains("151000"), "{err}");
        let mut wrong = bytes.clone();
        wrong[4..8].copy_from_slice(&3i32.to_le_bytes());
        std::fs::write(&path, &wrong).unwrap();
        let err = format!("{:#}", open(151_936));
        assert!(err.contains("version 3 for magic 20240801"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
