"""kiln replicas behind one OpenAI endpoint on Ray Serve (kiln.serve.ray_serve):

    python deploy/ray/serve.py --model DIR --min-replicas 1 --max-replicas 4 \\
        --num-gpus-per-replica 1 --target-ongoing-requests 32

--address host:port (or auto) joins a running Ray cluster; without it a local one is started.
"""

import sys

from kiln.serve.ray_serve import main

if __name__ == "__main__":
    sys.exit(main())
