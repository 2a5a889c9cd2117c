//! The files finch reads and writes, and their checks: llm.c token files (`tokens`), Hugging Face
//! model directories (`huggingface` for GPT-2, `hf_llama` for the Llama family), run checkpoints (`checkpoint`), run directories and the
//! model a directory names (`rundir`), the JSONL training log and its console (`trainlog`), and
//! the built-in tokenizers (`tokenizer`). Every parser refuses a
//! bad file with one line naming it; the fuzz targets in fuzz/ exercise each.

pub mod checkpoint;
pub mod hf_llama;
pub mod huggingface;
pub mod rundir;
pub mod tokenizer;
pub mod tokens;
pub mod trainlog;
