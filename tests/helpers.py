"""Test helpers usable outside pytest: a tiny random Phi model folder shaped like a staged model.

    python tests/helpers.py /tmp/tiny-phi      # writes the folder and prints its path

``make_tiny_phi(dir)`` writes config.json, generation_config.json, model.safetensors and a
small byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json), all loadable offline
with ``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)``.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

EOS = "<|endoftext|>"

# A minimal ChatML-like template, only written when asked for (Phi-2 itself ships none).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SUBJECTS = [
    "A 45-year-old man", "A 62-year-old woman", "A 7-year-old boy", "A pregnant woman",
    "An elderly patient", "A 30-year-old nurse", "A newborn infant", "A 19-year-old athlete",
]
_COMPLAINTS = [
    "chest pain radiating to the left arm", "fever and productive cough", "sudden weakness of the right side",
    "jaundice and dark urine", "polyuria and polydipsia", "a painless neck mass", "shortness of breath",
    "recurrent headaches with visual aura", "abdominal pain after fatty meals", "joint swelling at night",
]
_FINDINGS = [
    "elevated troponin", "a low hemoglobin", "hyperglycemia", "ST elevation in leads II, III and aVF",
    "bilateral infiltrates on chest x-ray", "raised bilirubin", "a positive ANA", "hyponatremia",
    "a thyroid nodule on ultrasound", "reduced ejection fraction",
]
_DIAGNOSES = [
    "myocardial infarction", "community-acquired pneumonia", "ischemic stroke", "hepatitis B",
    "type 1 diabetes mellitus", "papillary thyroid carcinoma", "heart failure", "migraine",
    "cholelithiasis", "gout", "SIADH", "systemic lupus erythematosus",
]
_DRUGS = ["aspirin", "metformin", "insulin", "amoxicillin", "furosemide", "allopurinol", "heparin",
          "levothyroxine", "prednisone", "alteplase"]


def medical_corpus(n_sentences: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic medical-sounding text: questions, options, reasoning and answers."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_sentences):
        dx = rng.sample(_DIAGNOSES, 4)
        lines.append(
            f"Question: {rng.choice(_SUBJECTS)} presents with {rng.choice(_COMPLAINTS)}. "
            f"Laboratory tests show {rng.choice(_FINDINGS)}. What is the most likely diagnosis?\n"
            f"Answer Choices:\nA. {dx[0]}\nB. {dx[1]}\nC. {dx[2]}\nD. {dx[3]}\n"
            f"Reasoning: the findings point to {dx[i % 4]}; first-line treatment is {rng.choice(_DRUGS)} "
            f"at {rng.randint(1, 500)} mg. Finding reasoning paths: {rng.choice(_FINDINGS)} -> {dx[i % 4]}.\n"
            f"### Answer: {'ABCD'[i % 4]}. {dx[i % 4]}"
        )
    return lines


def make_tokenizer(vocab_size: int = 1000, chat_template: bool = False):
    """A byte-level BPE tokenizer trained offline; '<|endoftext|>' is bos, eos, unk and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(medical_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        model_max_length=2048,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_phi(out_dir: str | Path, seed: int = 0, chat_template: bool = False) -> Path:
    """Write a 2-layer random PhiForCausalLM + tokenizer + generation config into ``out_dir``.

    Sizes: hidden 64, 4 heads (head_dim 16, rotary dim int(16 * 0.4) = 6 like Phi-2's
    partial rotary), MLP 128, vocab = the tokenizer's (~1000) -> ~0.2M parameters, a few
    hundred kB on disk, so every test can afford to load it.
    """
    import torch
    from transformers import GenerationConfig, PhiConfig, PhiForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(chat_template=chat_template)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = PhiConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        partial_rotary_factor=0.4,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    torch.manual_seed(seed)
    model = PhiForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "tiny-phi"
    print(make_tiny_phi(target))


def tiny_phi_batch(model_dir: str | Path, prompts: list[str]):  # noqa: ANN201
    """(model, tokenizer, ids, mask): the tiny Phi of ``model_dir`` in float32 (eval mode) and
    ``prompts`` as a left-padded batch, as the evaluate job pads one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medreason.evaluation.generation import _left_padded
    from medreason.tokenizer import prepare_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir))
    ids, mask = _left_padded([tok(t, add_special_tokens=False)["input_ids"] for t in prompts],
                             list(range(len(prompts))), tok.pad_token_id)
    return model, tok, ids, mask
