//! `finch tokenize`: text files, directories and JSONL → llm.c token shards for `finch train`.
//!
//! Documents are read in batches of about 16 MiB, tokenized in parallel (large documents in
//! chunks cut where GPT-2's pre-tokenizer cuts anyway) and written in document order. The output
//! is therefore the same on any number of threads, and memory is bounded by the batch, not the
//! corpus.

use crate::formats::hf_tokenizer::HfTokenizer;
use crate::formats::tokenizer::{gpt2_chunks, is_space, Gpt2, TextTokenizer, Tokenizer, CHUNK_BYTES, GPT2_EOT};
use crate::formats::tokens::{LLMC_HEADER_BYTES, LLMC_MAGIC, LLMC_MAGIC_U32, LLMC_VERSION_U32, META_FILE};
use crate::formats::trainlog::plural;
use crate::os::files::{create_dir, write_atomically};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `--tokenizer bytes` writes between two documents of the same split.
pub const BYTES_SEPARATOR: &[u8] = b"\n\n";
/// File name extensions taken from directories (case-insensitive); "jsonl" files are read as JSONL.
pub const DIR_EXTENSIONS: [&str; 4] = ["txt", "md", "jsonl", "ndjson"];

/// Text read per batch; tokens of one batch are all that is held in memory.
const BATCH_BYTES: usize = 16 << 20;

/// The flags of `finch tokenize`.
#[derive(clap::Args, Debug, Clone)]
#[command(
    allow_negative_numbers = true,
    after_help = "Documents: a text file (or stdin) is one document; each line of a JSONL file is one, the \
string at --field. Empty documents and blank JSONL lines are skipped.

Separators: gpt2 writes <|endoftext|> (50256) before every document, as llm.c does. bytes writes \
\"\\n\\n\" between the documents of a split (nothing before the first), so one file comes out as exactly \
its bytes. A tokenizer.json gets tokenizer_config.json's bos_token before and eos_token after every \
document (one of them when they are the same token, before; at least one must be named); the files \
are copied into --out, so that train and sample use the same tokenizer.

Token width: uint16 (llm.c's magic 20240520, version 1) while every id fits; a vocabulary above \
65,536 ids writes uint32 (magic 20240801, version 7).

Validation: document i (counting from 0, in input order) goes to val when \
floor((i+1)·F) > floor(i·F) for F = --val-fraction: floor(N·F) of N documents, evenly spread, the first \
always in train. A document is never split between train and val.

Examples:
  finch tokenize input.txt --out data                       # GPT-2 tokens in data/train_000000.bin
  finch tokenize corpus/ extra.jsonl --out data --val-fraction 0.05
  cat docs.jsonl | finch tokenize - --jsonl --field content --out data
  finch tokenize shakespeare.txt --tokenizer bytes --val-fraction 0 --out data-bytes
  finch tokenize posts.jsonl --tokenizer SmolLM2-135M/ --out data-smol    # the model's tokenizer.json
  finch train --data 'data/train_*.bin' --val 'data/val_*.bin' ..."
)]
pub struct TokenizeArgs {
    /// Text files, .jsonl files, directories (searched recursively for .txt, .md and .jsonl;
    /// hidden entries skipped; sorted), or - for stdin
    #[arg(value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// Output directory: train_000000.bin …, val_000000.bin … and meta.json
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Tokenizer: gpt2, bytes, or a Hugging Face tokenizer.json (or a model directory holding one);
    /// see Separators below
    #[arg(long, value_name = "gpt2|bytes|PATH", default_value = "gpt2")]
    pub tokenizer: String,
    /// JSONL: the field holding each document's text [default: text]; giving it reads stdin and
    /// every input file named on the command line as JSONL, like --jsonl
    #[arg(long, value_name = "NAME")]
    pub field: Option<String>,
    /// Read stdin and every input file named on the command line as JSONL, whatever its extension
    /// (.jsonl, .ndjson and .json files are read as JSONL anyway)
    #[arg(long)]
    pub jsonl: bool,
    /// Skip (and count) JSONL lines that are not JSON objects with a string --field, instead of
    /// stopping at the first
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Fraction of the documents that go to validation, in [0, 1); when that is no document (a
    /// corpus of fewer than 1/F documents, such as one text file), the last F of the tokens instead
    #[arg(long, value_name = "F", default_value_t = 0.01)]
    pub val_fraction: f64,
    /// Tokens per shard at most; documents may continue into the next shard
    #[arg(long, value_name = "N", default_value_t = 100_000_000)]
    pub shard_tokens: usize,
    /// Threads [default: all cores]; the output does not depend on it
    #[arg(long)]
    pub threads: Option<usize>,
    /// Replace the shards and meta.json of an earlier run in --out
    #[arg(long)]
    pub force: bool,
}

/// Whether document `i` (0-based, in input order) goes to validation; floor(N·F) of the first N
/// documents do, evenly spread. Depends on nothing but `i`, so documents can stream.
pub fn goes_to_val(i: u64, fraction: f64) -> bool {
    ((i + 1) as f64 * fraction).floor() > (i as f64 * fraction).floor()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Jsonl,
}

/// One input file (or stdin, when `path` is None).
struct Source {
    path: Option<PathBuf>,
    format: Format,
    size: Option<u64>,
}

impl Source {
    fn name(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "<stdin>".to_string(),
        }
    }
}

fn has_dir_extension(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    DIR_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext))
}

/// JSON lines by its name: .jsonl and .ndjson; also .json for a file named on the command line
/// (not in directories, where a .json is more often a configuration file than data).
fn is_jsonl(path: &Path, named: bool) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    ["jsonl", "ndjson"].iter().chain(named.then_some(&"json")).any(|e| e.eq_ignore_ascii_case(ext))
}

impl TokenizeArgs {
    /// The JSON field holding each document's text.
    pub fn field(&self) -> &str {
        self.field.as_deref().unwrap_or("text")
    }

    /// Whether stdin and the files named on the command line are JSONL whatever their names:
    /// --jsonl, or a --field, which only JSONL has.
    fn reads_jsonl(&self) -> bool {
        self.jsonl || self.field.is_some()
    }
}

/// Files under `dir` with a usable extension, depth first in name order; hidden entries and
/// symlinked directories (which could loop) are skipped.
fn walk(dir: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    let cannot = || format!("{}: cannot list the directory", dir.display());
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).with_context(cannot)? {
        let entry = entry.with_context(cannot)?;
        if !entry.file_name().to_string_lossy().starts_with('.') {
            let kind = entry.file_type().with_context(cannot)?;
            entries.push((entry.path(), kind));
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, kind) in entries {
        if kind.is_dir() {
            walk(&path, found)?;
        } else if has_dir_extension(&path) && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            found.push(path);
        }
    }
    Ok(())
}

fn collect_sources(args: &TokenizeArgs) -> Result<Vec<Source>> {
    if args.inputs.is_empty() {
        bail!("no inputs: give text files, .jsonl files, directories, or - for stdin");
    }
    let mut sources = Vec::new();
    let mut stdin_seen = false;
    for input in &args.inputs {
        let name = input.display();
        if input.as_os_str() == "-" {
            if stdin_seen {
                bail!("-: stdin can be read only once");
            }
            stdin_seen = true;
            let format = if args.reads_jsonl() { Format::Jsonl } else { Format::Text };
            sources.push(Source { path: None, format, size: None });
            continue;
        }
        let meta = match fs::metadata(input) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("{name}: no such file or directory"),
            Err(e) => bail!("{name}: cannot read: {e}"),
        };
        if meta.is_dir() {
            let mut found = Vec::new();
            walk(input, &mut found)?;
            if found.is_empty() {
                bail!(
                    "{name}: no .txt, .md, .jsonl or .ndjson files in this directory or below (hidden ones are skipped)"
                );
            }
            for path in found {
                let format = if is_jsonl(&path, false) { Format::Jsonl } else { Format::Text };
                let size = fs::metadata(&path).map(|m| m.len()).ok();
                sources.push(Source { path: Some(path), format, size });
            }
        } else {
            let format = if args.reads_jsonl() || is_jsonl(input, true) { Format::Jsonl } else { Format::Text };
            sources.push(Source { path: Some(input.clone()), format, size: Some(meta.len()) });
        }
    }
    if args.field.is_some() && sources.iter().all(|s| s.format == Format::Text) {
        bail!("--field {}: none of the inputs is JSONL (the directories hold only .txt and .md files)", args.field());
    }
    Ok(sources)
}

/// --tokenizer: a built-in name, or a tokenizer.json (or a directory holding one).
fn load_tokenizer(args: &TokenizeArgs) -> Result<TextTokenizer> {
    Ok(match args.tokenizer.as_str() {
        "gpt2" => TextTokenizer::Builtin(Tokenizer::Gpt2),
        "bytes" => TextTokenizer::Builtin(Tokenizer::Bytes),
        path if Path::new(path).exists() => {
            let tokenizer = HfTokenizer::load(Path::new(path), "--tokenizer")?;
            if tokenizer.bos.is_none() && tokenizer.eos.is_none() {
                bail!(
                    "--tokenizer {path}: no tokenizer_config.json beside it naming a bos_token or eos_token, so \
                     documents could not be told apart; add one"
                );
            }
            TextTokenizer::File(Box::new(tokenizer))
        }
        other => bail!("--tokenizer {other}: expected gpt2, bytes, or a tokenizer.json (or a directory holding one)"),
    })
}

fn check_flags(args: &TokenizeArgs) -> Result<()> {
    if args.shard_tokens == 0 || args.shard_tokens > i32::MAX as usize {
        bail!(
            "--shard-tokens must be between 1 and {} (the llm.c header holds an int32), got {}",
            i32::MAX,
            args.shard_tokens
        );
    }
    if !(0.0..1.0).contains(&args.val_fraction) {
        bail!("--val-fraction must be in [0, 1), got {}", args.val_fraction);
    }
    if let Some(n) = args.threads {
        crate::os::resources::check_threads(n)?;
    }
    if args.field().is_empty() {
        bail!("--field must name a JSON field");
    }
    Ok(())
}

/// A document as read: a whole text file, or one JSONL line.
struct RawDoc {
    source: usize,
    /// 1-based line of a JSONL document.
    line: usize,
    bytes: Vec<u8>,
}

/// Reads the sources in order, one document at a time.
struct Reader<'a> {
    sources: &'a [Source],
    next: usize,
    /// The JSONL source being read: (index, reader, last line number).
    open: Option<(usize, Box<dyn BufRead>, usize)>,
    bytes_read: u64,
}

impl Reader<'_> {
    fn next_batch(&mut self, max_bytes: usize) -> Result<Vec<RawDoc>> {
        let (mut batch, mut size) = (Vec::new(), 0);
        while size < max_bytes {
            match self.next_doc()? {
                Some(doc) => {
                    size += doc.bytes.len();
                    batch.push(doc);
                }
                None => break,
            }
        }
        Ok(batch)
    }

    fn next_doc(&mut self) -> Result<Option<RawDoc>> {
        loop {
            if let Some((source, reader, line)) = &mut self.open {
                let mut bytes = Vec::new();
                let n = reader
                    .read_until(b'\n', &mut bytes)
                    .with_context(|| format!("{}: cannot read", self.sources[*source].name()))?;
                if n == 0 {
                    self.open = None;
                    continue;
                }
                self.bytes_read += n as u64;
                *line += 1;
                while bytes.last().is_some_and(|&b| b == b'\n' || b == b'\r') {
                    bytes.pop();
                }
                // A byte-order mark (Windows editors write one) is not JSON.
                if *line == 1 && bytes.starts_with(b"\xef\xbb\xbf") {
                    bytes.drain(..3);
                }
                if bytes.iter().all(|&b| is_space(b)) {
                    continue;
                }
                return Ok(Some(RawDoc { source: *source, line: *line, bytes }));
            }
            let Some(source) = self.sources.get(self.next) else { return Ok(None) };
            let index = self.next;
            self.next += 1;
            let reader: Box<dyn BufRead> = match &source.path {
                Some(path) => Box::new(BufReader::new(
                    File::open(path).with_context(|| format!("{}: cannot open", source.name()))?,
                )),
                None => Box::new(std::io::stdin().lock()),
            };
            match source.format {
                Format::Jsonl => self.open = Some((index, reader, 0)),
                Format::Text => {
                    let mut bytes = Vec::with_capacity(source.size.unwrap_or(0) as usize);
                    let mut reader = reader;
                    reader.read_to_end(&mut bytes).with_context(|| format!("{}: cannot read", source.name()))?;
                    self.bytes_read += bytes.len() as u64;
                    return Ok(Some(RawDoc { source: index, line: 0, bytes }));
                }
            }
        }
    }
}

/// A document's text, ready to tokenize: UTF-8 for GPT-2 and a tokenizer.json, any bytes for the
/// byte tokenizer.
enum DocText {
    Utf8(String),
    Bytes(Vec<u8>),
}

impl DocText {
    fn len(&self) -> usize {
        match self {
            DocText::Utf8(s) => s.len(),
            DocText::Bytes(b) => b.len(),
        }
    }
}

/// Why a document was refused: a bad JSONL line (which --skip-bad-lines may skip) or not.
enum Refused {
    BadLine(String),
    Fatal(String),
}

/// Decodes one raw document: checks UTF-8, or parses the JSONL line and takes --field.
fn prepare(raw: RawDoc, source: &Source, tokenizer: Tokenizer, field: &str) -> Result<DocText, Refused> {
    match source.format {
        Format::Text => match tokenizer {
            Tokenizer::Bytes => Ok(DocText::Bytes(raw.bytes)),
            Tokenizer::Gpt2 | Tokenizer::HuggingFace => String::from_utf8(raw.bytes).map(DocText::Utf8).map_err(|e| {
                Refused::Fatal(format!(
                    "{}: not valid UTF-8 at byte offset {} ({} reads UTF-8 text; --tokenizer bytes takes any bytes)",
                    source.name(),
                    e.utf8_error().valid_up_to(),
                    tokenizer.name()
                ))
            }),
        },
        Format::Jsonl => {
            let at = format!("{}:{}", source.name(), raw.line);
            let text = parse_jsonl_line(&raw.bytes, &at, field).map_err(Refused::BadLine)?;
            Ok(match tokenizer {
                Tokenizer::Gpt2 | Tokenizer::HuggingFace => DocText::Utf8(text),
                Tokenizer::Bytes => DocText::Bytes(text.into_bytes()),
            })
        }
    }
}

/// The document of one JSONL line: the string at `field`, or why the line is refused (a
/// message that starts with `at`, "file:line").
pub fn parse_jsonl_line(line: &[u8], at: &str, field: &str) -> Result<String, String> {
    if line.trim_ascii_start().starts_with(b"[") {
        return Err(format!(
            "{at}: a JSON array, not JSON lines (one object per line); convert it first, e.g. with jq -c '.[]'"
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| format!("{at}: not valid JSON ({e})"))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(format!("{at}: expected a JSON object with a \"{field}\" field"));
    };
    match object.remove(field) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(format!("{at}: field \"{field}\" is {}, expected a string", json_kind(&other))),
        None => Err(format!("{at}: no \"{field}\" field (choose another with --field)")),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// A shard being written.
struct OpenShard {
    path: PathBuf,
    out: BufWriter<File>,
    count: usize,
}

/// Writes one split (train or val) into the staging directory as shards of at most
/// `shard_tokens` tokens, uint16 or (`wide`) uint32.
struct SplitWriter {
    dir: PathBuf,
    prefix: &'static str,
    shard_tokens: usize,
    wide: bool,
    open: Option<OpenShard>,
    /// Complete shards, synced to disk.
    written: Vec<PathBuf>,
    documents: u64,
    tokens: u64,
}

impl SplitWriter {
    fn new(dir: &Path, prefix: &'static str, shard_tokens: usize, wide: bool) -> SplitWriter {
        SplitWriter {
            dir: dir.to_owned(),
            prefix,
            shard_tokens,
            wide,
            open: None,
            written: Vec::new(),
            documents: 0,
            tokens: 0,
        }
    }

    fn push<T: Copy + Into<u32>>(&mut self, mut tokens: &[T]) -> Result<()> {
        let mut bytes = Vec::new();
        while !tokens.is_empty() {
            if self.open.is_none() {
                let path = self.dir.join(format!("{}_{:06}.bin", self.prefix, self.written.len()));
                let file = File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?;
                let mut out = BufWriter::with_capacity(1 << 20, file);
                // The header's count is filled in when the shard is complete.
                out.write_all(&[0; LLMC_HEADER_BYTES]).with_context(|| format!("{}: cannot write", path.display()))?;
                self.open = Some(OpenShard { path, out, count: 0 });
            }
            let shard = self.open.as_mut().expect("opened above");
            let n = tokens.len().min(self.shard_tokens - shard.count);
            bytes.clear();
            for &t in &tokens[..n] {
                let t: u32 = t.into();
                match self.wide {
                    true => bytes.extend_from_slice(&t.to_le_bytes()),
                    false => {
                        debug_assert!(t < 1 << 16, "token {t} does not fit in uint16");
                        bytes.extend_from_slice(&(t as u16).to_le_bytes());
                    }
                }
            }
            shard.out.write_all(&bytes).with_context(|| format!("{}: cannot write", shard.path.display()))?;
            shard.count += n;
            self.tokens += n as u64;
            tokens = &tokens[n..];
            if shard.count == self.shard_tokens {
                self.close_shard()?;
            }
        }
        Ok(())
    }

    /// Writes the header and syncs the shard to disk.
    fn close_shard(&mut self) -> Result<()> {
        let Some(mut shard) = self.open.take() else { return Ok(()) };
        let name = shard.path.display().to_string();
        let mut header = Vec::with_capacity(12);
        let (magic, version) = if self.wide { (LLMC_MAGIC_U32, LLMC_VERSION_U32) } else { (LLMC_MAGIC, 1) };
        for v in [magic, version, shard.count as i32] {
            header.extend_from_slice(&v.to_le_bytes());
        }
        shard.out.seek(SeekFrom::Start(0)).with_context(|| format!("{name}: cannot seek"))?;
        shard.out.write_all(&header).with_context(|| format!("{name}: cannot write"))?;
        let file =
            shard.out.into_inner().map_err(|e| e.into_error()).with_context(|| format!("{name}: cannot write"))?;
        file.sync_all().with_context(|| format!("{name}: cannot sync to disk"))?;
        self.written.push(shard.path);
        Ok(())
    }

    fn shard_names(&self) -> Vec<String> {
        self.written.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect()
    }
}

/// When no document went to validation (a corpus of fewer than 1/F documents, such as one text
/// file), the last ⌊N·F⌋ of train's N tokens become the validation split: cut from the end of the
/// last train shards (all closed) and written as val's. False when that is under two tokens.
fn hold_out_tail(train: &mut SplitWriter, val: &mut SplitWriter, fraction: f64) -> Result<bool> {
    let mut wanted = (train.tokens as f64 * fraction).floor() as usize;
    if wanted < 2 {
        return Ok(false);
    }
    let mut tail: Vec<u16> = Vec::with_capacity(wanted);
    while wanted > 0 {
        let path = train.written.last().expect("train holds more tokens than the tail").clone();
        let name = path.display().to_string();
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("{name}: cannot open"))?;
        let count =
            (file.metadata().with_context(|| format!("{name}: cannot read"))?.len() as usize - LLMC_HEADER_BYTES) / 2;
        let take = wanted.min(count);
        let keep = count - take;
        let mut bytes = vec![0u8; take * 2];
        file.seek(SeekFrom::Start((LLMC_HEADER_BYTES + keep * 2) as u64))
            .and_then(|_| file.read_exact(&mut bytes))
            .with_context(|| format!("{name}: cannot read"))?;
        let mut piece: Vec<u16> = bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        piece.append(&mut tail);
        tail = piece;
        if keep == 0 {
            drop(file);
            fs::remove_file(&path).with_context(|| format!("{name}: cannot remove"))?;
            train.written.pop();
        } else {
            let header: Vec<u8> = [LLMC_MAGIC, 1, keep as i32].iter().flat_map(|v| v.to_le_bytes()).collect();
            file.set_len((LLMC_HEADER_BYTES + keep * 2) as u64)
                .and_then(|()| file.seek(SeekFrom::Start(0)))
                .and_then(|_| file.write_all(&header))
                .and_then(|()| file.sync_all())
                .with_context(|| format!("{name}: cannot write"))?;
        }
        wanted -= take;
    }
    train.tokens -= tail.len() as u64;
    val.push(&tail)?;
    val.close_shard()?;
    Ok(true)
}

/// Whether `name` is a file `finch tokenize` writes into --out.
fn is_output_name(name: &str) -> bool {
    let shard = |prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(".bin"))
            .is_some_and(|digits| digits.len() >= 6 && digits.bytes().all(|b| b.is_ascii_digit()))
    };
    name == META_FILE || shard("train_") || shard("val_")
}

/// The hidden directory inside --out where shards are written until the run succeeds. Dropped
/// before [`Staging::commit`], it is removed, so a failed run leaves --out as it was.
struct Staging {
    out: PathBuf,
    dir: PathBuf,
    /// An earlier run's files in --out, replaced on commit (--force).
    old: Vec<PathBuf>,
    committed: bool,
}

impl Staging {
    /// Creates --out and the staging directory, refusing a file and (without --force) an
    /// earlier run's output.
    fn new(args: &TokenizeArgs) -> Result<Staging> {
        let out = &args.out;
        if out.exists() && !out.is_dir() {
            bail!("--out {}: is a file, expected a directory", out.display());
        }
        create_dir(out, "--out")?;
        let cannot = || format!("--out {}: cannot list the directory", out.display());
        let mut old: Vec<PathBuf> = Vec::new();
        for entry in fs::read_dir(out).with_context(cannot)? {
            let entry = entry.with_context(cannot)?;
            if is_output_name(&entry.file_name().to_string_lossy()) {
                old.push(entry.path());
            }
        }
        old.sort();
        if let (Some(first), false) = (old.first(), args.force) {
            bail!(
                "--out {}: already holds the output of a tokenize run ({}); pass --force to replace it, or choose \
                 another directory",
                out.display(),
                first.file_name().unwrap_or_default().to_string_lossy()
            );
        }
        let dir = out.join(".tokenize-staging");
        // Left over from a run that was killed: ours to remove.
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("{}: cannot remove", dir.display()))?;
        }
        create_dir(&dir, "--out")?;
        Ok(Staging { out: out.clone(), dir, old, committed: false })
    }

    /// Moves the shards into --out (each rename is atomic), removes the earlier run's files they
    /// do not replace, then writes meta.json last.
    fn commit(mut self, shards: &[&Path], meta: &Meta) -> Result<()> {
        let mut placed = Vec::new();
        for path in shards {
            let name = path.file_name().expect("shards have names");
            let target = self.out.join(name);
            fs::rename(path, &target).with_context(|| format!("{}: cannot move into place", target.display()))?;
            placed.push(target);
        }
        for old in self.old.iter().filter(|p| !placed.contains(p)) {
            fs::remove_file(old).with_context(|| format!("{}: cannot remove", old.display()))?;
        }
        write_atomically(&self.out.join(META_FILE), (serde_json::to_string_pretty(meta)? + "\n").as_bytes())?;
        self.committed = true;
        let _ = fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Progress: a bar over input bytes on a terminal, one line per batch otherwise.
enum Progress {
    Bar(ProgressBar),
    Lines { total: Option<u64> },
}

impl Progress {
    fn new(total: Option<u64>) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress::Lines { total };
        }
        let bar = match total {
            Some(total) => {
                let bar = ProgressBar::new(total);
                bar.set_style(
                    ProgressStyle::with_template(concat!(
                        "{bar:30} {decimal_bytes}/{decimal_total_bytes}  {decimal_bytes_per_sec}  {msg}  ",
                        "[{elapsed_precise} < {eta_precise}]"
                    ))
                    .expect("valid template"),
                );
                bar
            }
            None => {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {decimal_bytes}  {decimal_bytes_per_sec}  {msg}  [{elapsed_precise}]",
                    )
                    .expect("valid template"),
                );
                bar
            }
        };
        Progress::Bar(bar)
    }

    fn update(&self, bytes: u64, documents: u64, tokens: u64, seconds: f64) {
        match self {
            Progress::Bar(bar) => {
                bar.set_message(format!("{}, {tokens} tokens", plural(documents, "document")));
                bar.set_position(bytes);
            }
            Progress::Lines { total } => {
                let of = match total {
                    Some(t) if *t > 0 => {
                        format!(" of {:.1} MB ({:.0}%)", *t as f64 / 1e6, 100.0 * bytes as f64 / *t as f64)
                    }
                    _ => String::new(),
                };
                println!(
                    "read {:.1} MB{of}: {}, {tokens} tokens, {:.1} MB/s",
                    bytes as f64 / 1e6,
                    plural(documents, "document"),
                    bytes as f64 / 1e6 / seconds.max(1e-9)
                );
            }
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

#[derive(Serialize)]
struct SplitCounts<T> {
    train: T,
    val: T,
}

/// `DIR/meta.json`: what the shards hold, for people and for later commands.
#[derive(Serialize)]
struct Meta {
    tokenizer: Tokenizer,
    vocab_size: usize,
    /// The token before each document (gpt2), or null.
    eot_token: Option<u32>,
    /// A tokenizer.json's tokens before and after each document, or null.
    #[serde(skip_serializing_if = "Option::is_none")]
    bos_token: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eos_token: Option<u32>,
    /// 2 (uint16) or 4 (uint32).
    token_bytes: usize,
    separator: String,
    val_fraction: f64,
    /// How validation was split off: "documents" (whole ones, by `goes_to_val`), "tail" (the last
    /// --val-fraction of the tokens, when no document went to validation) or "none".
    val_split: &'static str,
    shard_tokens: usize,
    documents: SplitCounts<u64>,
    tokens: SplitCounts<u64>,
    shards: SplitCounts<Vec<String>>,
    input_bytes: u64,
    skipped_empty_documents: u64,
    skipped_bad_lines: u64,
}

/// What a run did, for the summary.
struct Summary {
    val_split: &'static str,
    documents: (u64, u64),
    tokens: (u64, u64),
    shards: (usize, usize),
    input_bytes: u64,
    /// Bytes of document text and the tokens they became (separators excluded).
    text_bytes: u64,
    text_tokens: u64,
    skipped_empty: u64,
    seconds: f64,
}

/// Runs `finch tokenize`.
pub fn run(args: TokenizeArgs) -> Result<()> {
    match args.threads {
        Some(n) => {
            check_flags(&args)?;
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .context("--threads: cannot start the threads")?;
            pool.install(|| tokenize(&args, BATCH_BYTES)).map(|_| ())
        }
        None => tokenize(&args, BATCH_BYTES).map(|_| ()),
    }
}

/// The whole run on the current rayon pool, reading `batch_bytes` of text at a time.
fn tokenize(args: &TokenizeArgs, batch_bytes: usize) -> Result<Summary> {
    check_flags(args)?;
    let sources = collect_sources(args)?;
    let staging = Staging::new(args)?;
    let text_tokenizer = load_tokenizer(args)?;
    let tokenizer = text_tokenizer.kind();
    let (total_bytes, separator) = announce(&sources, &text_tokenizer);
    let started = Instant::now();

    let wide = text_tokenizer.vocab_size() > 1 << 16;
    let mut train = SplitWriter::new(&staging.dir, "train", args.shard_tokens, wide);
    let mut val = SplitWriter::new(&staging.dir, "val", args.shard_tokens, wide);
    let mut reader = Reader { sources: &sources, next: 0, open: None, bytes_read: 0 };
    let progress = Progress::new(total_bytes);
    let (mut counts, mut skipped_empty) = (Counts::default(), 0u64);
    let mut bad_lines: Vec<String> = Vec::new();
    loop {
        let batch = reader.next_batch(batch_bytes)?;
        if batch.is_empty() {
            break;
        }
        let prepared: Vec<Result<DocText, Refused>> = batch
            .into_par_iter()
            .map(|raw| {
                let source = &sources[raw.source];
                prepare(raw, source, tokenizer, args.field())
            })
            .collect();
        let mut docs = Vec::with_capacity(prepared.len());
        for doc in prepared {
            match doc {
                Ok(doc) if doc.len() == 0 => skipped_empty += 1,
                Ok(doc) => docs.push(doc),
                Err(Refused::BadLine(msg)) if args.skip_bad_lines => bad_lines.push(msg),
                Err(Refused::BadLine(msg)) => {
                    progress.finish();
                    bail!("{msg}; pass --skip-bad-lines to skip such lines");
                }
                Err(Refused::Fatal(msg)) => {
                    progress.finish();
                    bail!("{msg}");
                }
            }
        }
        write_documents(&docs, &text_tokenizer, args.val_fraction, [&mut train, &mut val], &mut counts)?;
        progress.update(
            reader.bytes_read,
            counts.documents,
            train.tokens + val.tokens,
            started.elapsed().as_secs_f64(),
        );
    }
    progress.finish();

    if counts.documents == 0 {
        return Err(no_text(&sources, skipped_empty, bad_lines.len() as u64));
    }
    train.close_shard()?;
    val.close_shard()?;
    let val_split = match (val.documents, args.val_fraction > 0.0) {
        (0, true) if hold_out_tail(&mut train, &mut val, args.val_fraction)? => "tail",
        (0, _) => "none",
        _ => "documents",
    };
    let meta = Meta {
        tokenizer,
        vocab_size: text_tokenizer.vocab_size(),
        eot_token: (tokenizer == Tokenizer::Gpt2).then_some(GPT2_EOT),
        bos_token: match &text_tokenizer {
            TextTokenizer::File(t) => t.bos,
            TextTokenizer::Builtin(_) => None,
        },
        eos_token: match &text_tokenizer {
            TextTokenizer::File(t) => t.eos.filter(|&e| Some(e) != t.bos),
            TextTokenizer::Builtin(_) => None,
        },
        token_bytes: if wide { 4 } else { 2 },
        separator,
        val_fraction: args.val_fraction,
        val_split,
        shard_tokens: args.shard_tokens,
        documents: SplitCounts { train: train.documents, val: val.documents },
        tokens: SplitCounts { train: train.tokens, val: val.tokens },
        shards: SplitCounts { train: train.shard_names(), val: val.shard_names() },
        input_bytes: reader.bytes_read,
        skipped_empty_documents: skipped_empty,
        skipped_bad_lines: bad_lines.len() as u64,
    };
    let shards: Vec<&Path> = train.written.iter().chain(&val.written).map(|p| p.as_path()).collect();
    if let TextTokenizer::File(t) = &text_tokenizer {
        t.copy_into(&args.out, "--out")?;
    }
    staging.commit(&shards, &meta)?;

    let summary = Summary {
        val_split,
        documents: (train.documents, val.documents),
        tokens: (train.tokens, val.tokens),
        shards: (train.written.len(), val.written.len()),
        input_bytes: reader.bytes_read,
        text_bytes: counts.text_bytes,
        text_tokens: counts.text_tokens,
        skipped_empty,
        seconds: started.elapsed().as_secs_f64(),
    };
    print_summary(args, &summary, &bad_lines);
    Ok(summary)
}

/// The opening line: what is read, with which tokenizer, on how many threads. Returns the input's
/// size (when every source has one) and how documents are separated, for meta.json.
fn announce(sources: &[Source], text_tokenizer: &TextTokenizer) -> (Option<u64>, String) {
    let tokenizer = text_tokenizer.kind();
    let total_bytes: Option<u64> = sources.iter().map(|s| s.size).sum();
    let (files, stdin) =
        (sources.iter().filter(|s| s.path.is_some()).count(), sources.iter().any(|s| s.path.is_none()));
    let what = match (files, stdin) {
        (0, _) => "stdin".to_string(),
        (n, s) => plural(n as u64, "file") + if s { " and stdin" } else { "" },
    };
    let size = total_bytes.map(|b| format!(", {:.1} MB", b as f64 / 1e6)).unwrap_or_default();
    let separator = match text_tokenizer {
        TextTokenizer::Builtin(Tokenizer::Gpt2) => "<|endoftext|> (50256) before each document".to_string(),
        TextTokenizer::Builtin(_) => "\"\\n\\n\" between documents".to_string(),
        TextTokenizer::File(t) => t.describe_separator(),
    };
    let name = match text_tokenizer {
        TextTokenizer::File(t) => t.dir.join(crate::formats::hf_tokenizer::TOKENIZER_FILE).display().to_string(),
        TextTokenizer::Builtin(t) => t.name().to_string(),
    };
    println!(
        "tokenize: {what}{size} with {name} (vocab {}, {separator}) on {}",
        text_tokenizer.vocab_size(),
        plural(rayon::current_num_threads() as u64, "thread")
    );
    if tokenizer == Tokenizer::Gpt2 {
        Gpt2::get(); // build it now rather than inside the first parallel batch
    }
    (total_bytes, separator)
}

/// Documents, text bytes and the tokens they became (separators excluded), so far.
#[derive(Default)]
struct Counts {
    documents: u64,
    text_bytes: u64,
    text_tokens: u64,
}

/// Writes one batch of documents, in order, each to train or val (see `goes_to_val`); their GPT-2
/// chunks are tokenized in parallel first.
fn write_documents(
    docs: &[DocText],
    tokenizer: &TextTokenizer,
    val_fraction: f64,
    [train, val]: [&mut SplitWriter; 2],
    counts: &mut Counts,
) -> Result<()> {
    if let TextTokenizer::File(hf) = tokenizer {
        return write_hf_documents(docs, hf, val_fraction, [train, val], counts);
    }
    // Tokenize every chunk of the batch in parallel, then write the documents in order.
    let chunks: Vec<(usize, &str)> = docs
        .iter()
        .enumerate()
        .flat_map(|(i, d)| match d {
            DocText::Utf8(s) => gpt2_chunks(s, CHUNK_BYTES).into_iter().map(|c| (i, c)).collect(),
            DocText::Bytes(_) => Vec::new(),
        })
        .collect();
    let encoded: Vec<Vec<u32>> = chunks.par_iter().map(|(_, c)| Gpt2::get().encode(c)).collect();
    let mut next_chunk = 0;
    for (i, doc) in docs.iter().enumerate() {
        let split = if goes_to_val(counts.documents, val_fraction) { &mut *val } else { &mut *train };
        counts.documents += 1;
        split.documents += 1;
        counts.text_bytes += doc.len() as u64;
        match doc {
            DocText::Utf8(_) => {
                split.push(&[GPT2_EOT])?;
                while next_chunk < chunks.len() && chunks[next_chunk].0 == i {
                    counts.text_tokens += encoded[next_chunk].len() as u64;
                    split.push(&encoded[next_chunk])?;
                    next_chunk += 1;
                }
            }
            DocText::Bytes(bytes) => {
                if split.documents > 1 {
                    split.push(BYTES_SEPARATOR)?;
                }
                counts.text_tokens += bytes.len() as u64;
                split.push(bytes)?;
            }
        }
    }
    Ok(())
}

/// [`write_documents`] for a tokenizer.json: each document encoded whole (in parallel), then
/// written in order between its BOS and EOS.
fn write_hf_documents(
    docs: &[DocText],
    hf: &HfTokenizer,
    val_fraction: f64,
    [train, val]: [&mut SplitWriter; 2],
    counts: &mut Counts,
) -> Result<()> {
    let encoded: Vec<Vec<u32>> = docs
        .par_iter()
        .map(|d| match d {
            DocText::Utf8(text) => hf.encode(text),
            DocText::Bytes(_) => unreachable!("prepare gives a tokenizer.json UTF-8 text"),
        })
        .collect::<Result<_>>()?;
    for (doc, ids) in docs.iter().zip(&encoded) {
        let split = if goes_to_val(counts.documents, val_fraction) { &mut *val } else { &mut *train };
        counts.documents += 1;
        split.documents += 1;
        counts.text_bytes += doc.len() as u64;
        counts.text_tokens += ids.len() as u64;
        split.push(&hf.frame(ids))?;
    }
    Ok(())
}

/// The error for inputs that held no document to tokenize, saying what they held instead.
fn no_text(sources: &[Source], skipped_empty: u64, bad_lines: u64) -> anyhow::Error {
    let name = match sources {
        [one] => one.name(),
        many => format!("the {} inputs", many.len()),
    };
    let why = match (skipped_empty, bad_lines) {
        (0, 0) => "no documents".to_string(),
        (e, 0) => plural(e, "empty document"),
        (e, b) => format!("{} and {}", plural(e, "empty document"), plural(b, "skipped bad line")),
    };
    anyhow::anyhow!("{name}: no text to tokenize ({why})")
}

fn print_summary(args: &TokenizeArgs, s: &Summary, bad_lines: &[String]) {
    let mut skipped = Vec::new();
    if s.skipped_empty > 0 {
        skipped.push(format!("{} empty", s.skipped_empty));
    }
    if let Some(first) = bad_lines.first() {
        skipped.push(format!("{}, the first: {first}", plural(bad_lines.len() as u64, "bad line")));
    }
    let skipped = if skipped.is_empty() { String::new() } else { format!(" (skipped {})", skipped.join("; ")) };
    println!("documents: {} train, {} val{skipped}", s.documents.0, s.documents.1);
    println!(
        "tokens:    {} train, {} val; {:.2} bytes/token",
        s.tokens.0,
        s.tokens.1,
        s.text_bytes as f64 / s.text_tokens.max(1) as f64
    );
    println!(
        "speed:     {:.1} MB in {:.2} s, {:.1} MB/s",
        s.input_bytes as f64 / 1e6,
        s.seconds,
        s.input_bytes as f64 / 1e6 / s.seconds.max(1e-9)
    );
    let shards = |n: usize, prefix: &str| match n {
        0 => None,
        1 => Some(format!("{prefix}_000000.bin")),
        n => Some(format!("{prefix}_000000.bin .. {prefix}_{:06}.bin", n - 1)),
    };
    let written: Vec<String> = [shards(s.shards.0, "train"), shards(s.shards.1, "val"), Some(META_FILE.to_string())]
        .into_iter()
        .flatten()
        .collect();
    println!("wrote:     {}: {}", args.out.display(), written.join(", "));
    if s.val_split == "tail" {
        println!(
            // {:?}: 1e-300 rather than three hundred digits.
            "validation: the last {:?} of the tokens ({}), since {} × --val-fraction {:?} < 1 leaves no whole \
             document to hold out",
            args.val_fraction,
            s.tokens.1,
            plural(s.documents.0, "document"),
            args.val_fraction
        );
    } else if s.documents.1 == 0 && args.val_fraction > 0.0 {
        println!(
            "note: no validation split: {} × --val-fraction {:?} < 1, and too few tokens to hold out the last \
             {:?} of them",
            plural(s.documents.0, "document"),
            args.val_fraction,
            args.val_fraction
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_batches_give_the_same_output_as_one() {
        let dir = std::env::temp_dir().join(format!("finch-tokenize-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.jsonl");
        let lines: Vec<String> =
            (0..50).map(|i| format!("{{\"text\": \"Document {i}: {}\"}}", "words and more ".repeat(i))).collect();
        fs::write(&input, lines.join("\n")).unwrap();
        let mut outputs = Vec::new();
        for batch in [1, 100, BATCH_BYTES] {
            let out = dir.join(format!("out-{batch}"));
            let args = TokenizeArgs {
                inputs: vec![input.clone()],
                out: out.clone(),
                tokenizer: "gpt2".into(),
                field: None,
                jsonl: false,
                skip_bad_lines: false,
                val_fraction: 0.1,
                shard_tokens: 300,
                threads: None,
                force: false,
            };
            let summary = tokenize(&args, batch).unwrap();
            assert_eq!(summary.documents, (45, 5));
            let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap())
                .map(|e| (e.file_name().to_string_lossy().into_owned(), fs::read(e.path()).unwrap()))
                .collect();
            files.sort();
            outputs.push(files);
        }
        assert!(outputs[0].len() > 3, "expected several shards");
        assert_eq!(outputs[0], outputs[1]);
        assert_eq!(outputs[0], outputs[2]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_error_after_some_batches_leaves_no_shards() {
        let dir = std::env::temp_dir().join(format!("finch-tokenize-unit-late-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let input = dir.join("in.jsonl");
        fs::write(&input, "{\"text\": \"one two three\"}\n".repeat(100) + "{}\n").unwrap();
        let out = dir.join("out");
        let args = TokenizeArgs {
            inputs: vec![input],
            out: out.clone(),
            tokenizer: "gpt2".into(),
            field: None,
            jsonl: false,
            skip_bad_lines: false,
            val_fraction: 0.0,
            shard_tokens: 5,
            threads: None,
            force: false,
        };
        // Batches of one line: 100 documents are written to shards before line 101 fails.
        let Err(err) = tokenize(&args, 1) else { panic!("should fail at line 101") };
        assert!(format!("{err:#}").contains("in.jsonl:101: no \"text\" field"), "{err:#}");
        assert_eq!(fs::read_dir(&out).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn output_names() {
        assert!(is_output_name("train_000000.bin") && is_output_name("val_001234.bin") && is_output_name("meta.json"));
        assert!(!is_output_name("train.bin") && !is_output_name("train_00.bin") && !is_output_name("notes.txt"));
    }
}
