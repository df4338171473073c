"""Reading back what a W&B offline run wrote (the service process writes the run file asynchronously)."""
import glob
import os
import time


def offline_run_records(save_dir, keys, timeout: float = 60.0):
    """Finish the open run, wait for the service to flush, and return (run folder, bytes of its .wandb file).

    wandb >= 0.2x writes the ``.wandb`` file from a separate service process; ``finish()`` can return
    before the last records reach the disk. This polls (up to ``timeout`` seconds) until every byte
    string in ``keys`` is in the file and fails with the file's size otherwise: no hang, no sleep-and-hope.
    """
    import wandb

    if wandb.run is not None:
        wandb.finish()
    try:
        wandb.teardown()  # stops the service process, which flushes every run it holds
    except Exception:  # noqa: BLE001  (older SDKs without teardown: the polling below still applies)
        pass
    runs = glob.glob(os.path.join(str(save_dir), "wandb", "offline-run-*"))
    assert len(runs) == 1, f"expected one offline run in {save_dir}/wandb, found {runs}"
    deadline = time.monotonic() + timeout
    while True:
        records = glob.glob(os.path.join(runs[0], "*.wandb"))
        blob = open(records[0], "rb").read() if records else b""
        missing = [k for k in keys if k not in blob]
        if not missing:
            return runs[0], blob
        if time.monotonic() > deadline:
            raise AssertionError(f"{missing} not in {records} ({len(blob)} bytes) after {timeout:.0f} s")
        time.sleep(0.2)
