"""Stages 2 and 3: a pretrained causal LLM that reads, predicts and describes brain tokens (docs/design.md).

    config.py      typed configs of stages 2 and 3 (LLMAlignConfig, InstructConfig)
    vocabulary.py  the K brain tokens and scan markers, their rows initialised from the stage-1 codebook
    connectivity.py  the P connectivity tokens after the codes (network-pair FC in levels of the train split)
    layout.py      the time-major scan layout, the block-causal F2F mask, F2F targets, position ids
    model.py       AlignModel: backbone (+ the features mode's brain side); forward(batch) -> F2F / F2T / T2T losses
    data.py        batches: scans through the frozen brain tokenizer, captions, text chunks
    evaluate.py    F2F accuracy beside its baselines, caption fidelity beside its controls, T2T perplexity
    train.py       train(cfg, AlignInputs, runtime): the DeepSpeed loop (fmrilm_core), resume first
    export.py      the saved folder (stock-loadable HF model or PEFT adapter + brain.json + lineage.json + the
                   model card) and its loader
    instruct.py    stage 3: instruction tuning on the corpus's items, excluded attributes removed from every item
    prompt.py      the prompt a folder is asked with (formats, in-context examples, layout) and its KV-cached run
    scoring.py     how a folder answers: option log-likelihoods on the cached prompt, constrained number decoding,
                   expected values
    ask.py         `fmrilm ask`: one scan, one question
    zero3.py       DeepSpeed ZeRO-3 around the backbone (stages 2 and 3): live config, peft and LoRA merges on
                   partitioned weights

Imports torch, transformers, peft, deepspeed (through fmrilm_core) and the stage-1 and corpus packages; never
`cluster`, ray or mlflow.
"""
