"""The Trainer under torchrun with DDP (gloo, 2 CPU processes), unchanged script."""

import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    from pyengine.data import ByteTokenizer, LanguageModelDataset
    from pyengine.models import LSTMLanguageModel
    from pyengine.train import Trainer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = LSTMLanguageModel(256, 8, 16, 1)
    data = LanguageModelDataset.from_text("Distributed data parallel training. " * 20,
                                          ByteTokenizer(), batch_size=4, seq_len=8)
    trainer = Trainer(model, lr=1e-2, max_steps=4, accumulation_steps=2, grad_clip=1.0,
                      output_dir=sys.argv[1], tensorboard=False, checkpoint_every=2)
    trainer.fit(data)
    if trainer.is_main:
        torch.save(model.state_dict(), sys.argv[1] + "/final.pt")
    # one string per print: with unbuffered output, print's separate writes of each argument
    # from the two ranks can interleave in the shared pipe
    print(f"rank {trainer.rank} of {trainer.world_size} step {trainer.global_step}")

    # evaluation is split across the ranks and reduced: every rank gets the whole set's numbers
    val = LanguageModelDataset.from_text("Validation text, read once. " * 12, ByteTokenizer(),
                                         batch_size=6, seq_len=8)
    lm = trainer.evaluate(val)
    from pyengine.models import LSTMClassifier
    from pyengine.data import ClassificationDataset
    g = torch.Generator().manual_seed(1)
    texts = [bytes(torch.randint(97, 123, (int(n),), generator=g).tolist()).decode()
             for n in torch.randint(3, 12, (23,), generator=g)]
    labels = [len(t) % 3 for t in texts]
    cls = ClassificationDataset.from_texts(texts, labels, ByteTokenizer(), batch_size=4,
                                           shuffle=False)
    torch.manual_seed(0)
    clf = Trainer(LSTMClassifier(256, 3, embed_dim=8, hidden_size=16), tensorboard=False)
    c = clf.evaluate(cls)
    numbers = repr([lm["loss"], lm["accuracy"], c["loss"], c["accuracy"], c["f1_macro"],
                    c["report"]["macro"]["support"]])
    with open(f"{sys.argv[1]}/eval_{trainer.rank}.txt", "w") as f:
        f.write(numbers)
""")


def _evals(out_dir):
    """rank -> the evaluation numbers that rank wrote (to a file each: lines printed by two
    processes into one pipe can interleave)."""
    import ast

    return {int(path.stem.split("_")[1]): ast.literal_eval(path.read_text())
            for path in out_dir.glob("eval_*.txt")}


@pytest.mark.slow
def test_ddp_two_gloo_processes_match_one_process(tmp_path, checkout_env):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=300, env=checkout_env)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "rank 0 of 1 step 4" in single.stdout
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), str(tmp_path / "two")], capture_output=True, text=True, timeout=300,
        env=checkout_env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "rank 1 of 2 step 4" in ddp.stdout and "rank 0 of 2 step 4" in ddp.stdout
    one = torch.load(tmp_path / "one" / "final.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "final.pt", weights_only=True)
    # each rank reads half the streams; gradients are normalised by the global token count,
    # so DDP's average equals the single process's full-batch gradient
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two" / "last.pt").is_file()
    # evaluation split across the two ranks equals the single process's, on both ranks
    single_eval, ddp_eval = _evals(tmp_path / "one"), _evals(tmp_path / "two")
    assert set(ddp_eval) == {0, 1}
    for rank in (0, 1):
        assert ddp_eval[rank][-1] == single_eval[0][-1] == 23  # every example once
        assert ddp_eval[rank] == pytest.approx(single_eval[0], rel=2e-4, abs=1e-6)
