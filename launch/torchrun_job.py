"""torchrun entry point of the tp_gdn main job; every rank runs it, rank 0 prints the table.

One node:     torchrun --standalone --nproc-per-node 4 launch/torchrun_job.py --checkpoint CKPT
Several:      torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
                  launch/torchrun_job.py --checkpoint CKPT
"""

from tp_gdn.launch.job import main

if __name__ == "__main__":
    main()
