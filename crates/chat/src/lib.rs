//! Gemma 4's chat formats, shared by every engine (MLX in-process, llama.cpp) and free of any tensor
//! library: rendering the model's own chat template, and parsing its output into content, reasoning and tool
//! calls. Kept separate so the fuzz targets and the llama.cpp engine use them without linking MLX.
#![deny(missing_docs)]

pub mod answer;
pub mod event;
pub mod guard;
pub mod logprobs;
pub mod prompt;
pub mod sampling;
pub mod stop;
pub mod template;
pub mod tools;
