"""Model specs resolve to the right place; clear errors otherwise; the embedded model answers."""

import json

import pytest
import torch

from align.config import LoraArgs, ModelArgs
from align.errors import ModelError
from align.models import (apply_lora, inference_device, load_model, physical_memory_bytes, resolve_device, resolve_model,
                          save_trained, save_tiny_model, shared_models, tiny_tokenizer, weight_bytes)


def test_tiny_tokenizer_round_trips_any_text():
    tok = tiny_tokenizer()
    text = "héllo → {\"a\": [1, 2]} ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id


def test_local_model_dir_loads(tiny_model_dir):
    model, tok = load_model(ModelArgs(model=str(tiny_model_dir)))
    assert resolve_model(str(tiny_model_dir)).kind == "local"
    assert model.config.vocab_size == len(tok)
    assert model.dtype == torch.float32



def test_shared_models_load_each_model_once_inside_the_block(tiny_model_dir):
    spec = ModelArgs(model=str(tiny_model_dir))
    with shared_models():
        first = load_model(spec)
        with shared_models():  # a nested block shares the outer one's copies
            assert load_model(ModelArgs(model=str(tiny_model_dir)))[0] is first[0]
        assert load_model(spec)[1] is first[1]
        other = load_model(ModelArgs(model=str(tiny_model_dir), dtype="bfloat16"))[0]  # other options: its own copy
        assert other is not first[0] and other.dtype == torch.bfloat16 and first[0].dtype == torch.float32
    assert load_model(spec)[0] is not first[0]  # outside: a fresh copy each time
    assert load_model(spec)[0] is not load_model(spec)[0]


def test_shared_models_drop_the_least_recently_used_past_their_budget(tiny_model_dir, tmp_path):
    specs = [ModelArgs(model=str(tiny_model_dir))] + [ModelArgs(model=str(save_tiny_model(tmp_path / f"m{i}", seed=i)))
                                                       for i in (1, 2)]
    model = load_model(specs[0])[0]
    size = weight_bytes(model)
    assert size == sum(p.numel() * 4 for p in model.parameters()) + sum(b.numel() * 4 for b in model.buffers())
    with shared_models(max_bytes=2 * size):  # room for two
        a, b = load_model(specs[0])[0], load_model(specs[1])[0]
        assert load_model(specs[0])[0] is a  # a is now the most recently used
        c = load_model(specs[2])[0]  # b goes
        assert load_model(specs[0])[0] is a and load_model(specs[2])[0] is c
        assert load_model(specs[1])[0] is not b
    with shared_models(max_bytes=0):  # nothing fits: only the newest stays
        a = load_model(specs[0])[0]
        assert load_model(specs[0])[0] is a
        load_model(specs[1])
        assert load_model(specs[0])[0] is not a
    assert physical_memory_bytes() > 2**30  # the default budget is a quarter of it


def test_inference_device_is_this_process_gpu_when_one_is_visible(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert inference_device() is None and resolve_device("auto") is None and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU here: what a GPU machine sees
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert inference_device() == "cuda:1" == resolve_device("auto")
    assert resolve_device(None) is None  # trainers place their models themselves
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    import align.models

    monkeypatch.setattr(align.models, "inference_device", lambda: "meta")  # a device this CPU has: no weights
    model, _ = load_model(ModelArgs(model=str(tiny_model_dir)), device="auto")
    assert next(model.parameters()).device.type == "meta"
    assert next(load_model(ModelArgs(model=str(tiny_model_dir)))[0].parameters()).device.type == "cpu"

@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-model", "unknown model 'no-such-model': not an embedded alias"),
        ("/no/such/dir", "model path does not exist: /no/such/dir"),
        ("./relative/missing", "model path does not exist"),
    ],
)
def test_bad_specs_are_clear(spec, message):
    with pytest.raises(ModelError, match=message):
        resolve_model(spec)


def test_directory_without_model(tmp_path):
    with pytest.raises(ModelError, match="holds no model"):
        resolve_model(str(tmp_path))


def test_hub_id_offline_is_clear():
    with pytest.raises(ModelError, match="cannot load 'someorg/somemodel' from the Hugging Face hub"):
        load_model(ModelArgs(model="someorg/somemodel"))


def test_lora_targets_all_linear_layers(tiny_model_dir):
    model, _ = load_model(ModelArgs(model=str(tiny_model_dir)))
    peft_model = apply_lora(model, LoraArgs(lora_r=4, lora_alpha=8))
    adapted = {n.split(".lora_A")[0].split(".")[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_adapter_chain_merges_in_order(tiny_model_dir, tmp_path):
    """An adapter trained on top of another run resolves to base + both adapters, merged in order."""
    model, tok = load_model(ModelArgs(model=str(tiny_model_dir)))
    first = apply_lora(model, LoraArgs(lora_r=2, lora_alpha=4)).eval()  # peft leaves train mode (dropout) on
    with torch.no_grad():
        for n, p in first.named_parameters():
            if "lora_B" in n:
                p.fill_(0.01)
    run1 = tmp_path / "run1"
    save_trained(first, tok, run1, str(tiny_model_dir), merge=False)
    (run1 / "version.json").write_text(json.dumps({"name": "v1"}))
    assert json.loads((run1 / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)

    merged_v1, _ = load_model(ModelArgs(model=str(run1)))
    second = apply_lora(merged_v1, LoraArgs(lora_r=2, lora_alpha=4)).eval()
    with torch.no_grad():
        for n, p in second.named_parameters():
            if "lora_B" in n:
                p.fill_(-0.02)
    run2 = tmp_path / "run2"
    save_trained(second, tok, run2, str(run1), merge=False)
    resolved = resolve_model(str(run2 / "adapter"))
    assert resolved.adapters == (str(run1 / "adapter"), str(run2 / "adapter"))
    assert resolved.base == str(tiny_model_dir.resolve())

    ids = torch.tensor([[1, 2, 3, 4]])
    expected = second(input_ids=ids).logits
    loaded, _ = load_model(ModelArgs(model=str(run2 / "adapter")))
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.embedded
def test_embedded_model_answers_a_simple_question():
    """SmolLM2-135M-Instruct, dequantised from the shipped GGUF, answers greedily and correctly."""
    model, tok = load_model(ModelArgs())
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert resolve_model("smollm2-135m-instruct").kind == "embedded"
