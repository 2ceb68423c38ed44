"""Run by tests/test_train.py under `torchrun --nproc_per_node 2`: one fit() across 2 CPU processes."""

import os
import sys

from safetensors.torch import save_file

import fiftyone as fo

from fiftyone_grounding.engine.fit import fit


def main(dataset_name: str, out_dir: str) -> None:
    rank = int(os.environ["RANK"])
    result = fit(fo.load_dataset(dataset_name), preset="tiny", out_dir=out_dir, epochs=2, batch_size=8,
                 lr=1e-3, progress=False, cpu=True, resume=False, train_split="train", val_split="val")
    # Every rank dumps the weights it holds in memory, to check both trained one model.
    world = int(os.environ["WORLD_SIZE"])
    state = result.model.trainable_state_dict()
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(f"{world}\n{result.scheduler_steps}\n{result.optimizer_steps}\n")  # each rank's steps


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
