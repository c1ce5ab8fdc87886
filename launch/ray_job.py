"""Ray driver of the tp_gdn main job: one actor per rank, placed by a placement group.

Local Ray:    python launch/ray_job.py --tp 2
A cluster:    python launch/ray_job.py --ray-address auto --tp 16 --checkpoint CKPT
(the same as `tp-gdn run --launcher ray ...`)
"""

import sys

from tp_gdn.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", "--launcher", "ray", *sys.argv[1:]]))
