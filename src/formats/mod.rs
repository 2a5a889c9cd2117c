//! The files finch reads and writes, and their checks: llm.c token files (`tokens`), Hugging Face
//! model directories (`huggingface` for GPT-2, `hf_llama` for the Llama family, `model_dir` for
//! whichever config.json names), run checkpoints (`checkpoint`), run directories and the model a
//! directory names (`rundir`), the JSONL training log and its console (`trainlog`), the built-in
//! tokenizers (`tokenizer`) and Hugging Face tokenizer.json files (`hf_tokenizer`). Every parser refuses a bad file with one line naming it;
//! the fuzz targets in fuzz/ exercise each.

pub mod checkpoint;
pub mod hf_llama;
pub mod hf_tokenizer;
pub mod huggingface;
pub mod model_dir;
pub mod rundir;
pub mod tokenizer;
pub mod tokens;
pub mod trainlog;
