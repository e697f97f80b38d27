"""Build a tiny random Llama model offline (run with the engine venv's python).

    python build_tiny_model.py OUT_DIR

A byte-level BPE tokenizer trained on a small generated corpus (vocab ~512,
special tokens, a chat template) and a random LlamaConfig (hidden 128, 2
layers, 2 heads of dim 64), saved with safetensors. About 5 s.
"""
import json
import os
import random
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def main(out: str) -> None:
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return
    os.makedirs(out, exist_ok=True)
    rng = random.Random(0)
    words = ["the", "model", "sleeps", "wakes", "router", "token", "engine", "memory", "fast",
             "slow", "request", "answer", "hello", "world", "gpu", "cache", "stream", "batch"]
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) for _ in range(3000)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", chat_template=CHAT_TEMPLATE,
                                   model_max_length=256)
    fast.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=256,
                      bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                      pad_token_id=fast.pad_token_id, tie_word_embeddings=False,
                      torch_dtype="float32")
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "kvrouter-tiny.json"), "w") as fh:
        json.dump({"built_by": "tests/engine/build_tiny_model.py"}, fh)


if __name__ == "__main__":
    main(sys.argv[1])
