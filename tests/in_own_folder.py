"""train.py, each process of a launch in a folder of its own, as on machines that each have their own copy of a
relative logdir: accelerate launch ... tests/in_own_folder.py FOLDER_OF_PROCESS_0 FOLDER_OF_PROCESS_1 ARGS."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    os.chdir(sys.argv[1 + int(os.environ["RANK"])])
    import train

    code = train.main(sys.argv[3:])
    import torch.distributed

    # Where the processes end together (here: the session found finished) they leave the group first.
    assert code != 0 or not torch.distributed.is_initialized(), "train.main left the process group standing"
    sys.exit(code)
