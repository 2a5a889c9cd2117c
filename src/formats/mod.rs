//! The files finch reads and writes, and their checks: llm.c token files (`tokens`), Hugging Face
//! model directories (`huggingface`), run checkpoints (`checkpoint`), the JSONL training log and
//! its console (`trainlog`), and the built-in tokenizers (`tokenizer`). Every parser refuses a
//! bad file with one line naming it; the fuzz targets in fuzz/ exercise each.

pub mod checkpoint;
pub mod huggingface;
pub mod tokenizer;
pub mod tokens;
pub mod trainlog;
