"""``sftkit export``: a trained model made ready for the programs that serve it, and proved to answer as it did in
sftkit. ``gguf_file`` writes a GGUF file (weights, tokenizer, chat template, stop tokens) for llama.cpp and
Ollama; ``ollama`` writes the Modelfile beside it; ``vllm`` writes a Hugging Face folder for vLLM; ``checks``
reads each back with programs sftkit did not write (transformers' GGUF reader, llama.cpp) and compares it with
the trained model; ``job`` runs an export and writes its report.
"""
