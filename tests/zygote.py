"""A process that has imported a script's heavy libraries once, and forks a copy for each run.

dspy_example.py spends about 6 s of every run importing LiteLLM (its pydantic types), and every
real run of it and of openai_finetune.py about 5 s more importing torch and transformers for
the similarity score: most of the time of a test that runs one against a fake server, and the
tests run them about two hundred times. conftest.py's `run_script_in` starts this file once per
pytest worker and script, and asks it, for each run, to fork: the child takes the test's
working directory, environment, argv and standard streams (passed as file descriptors over a
Unix socket), runs the script as `python SCRIPT ARGS` would (`runpy.run_path` as `__main__`),
and ends as Python's exit does what a test can see: threads joined, atexit handlers run, streams
flushed, the exit code of SystemExit. It skips the interpreter's teardown after that (freeing
every module of the heavy libraries, which touches each of their pages once more): 2.3 of the
2.4 s that a DSPy run stopped by a bad flag took here. The child is a real process with its own
pid, exit code and signals; only the imports are done.

What the child inherits that a fresh process would not: the modules imported here (argv after
the socket path) and tiktoken's two encodings, already parsed (parse_encodings), nothing else.
None of them reads at import time a variable the tests change (keys and base URLs are read when
a client is made; the models load from local folders, so the hub settings of huggingface_hub do
not matter for the DSPy and OpenAI scripts; matplotlib reads its settings file from HOME, where
no test writes one, and picks no backend until the script's matplotlib.use("Agg")); no thread is
running when it forks (checked: importing them starts none); torch has run no operation, so its
OpenMP pool starts in the child. For huggingface_lora.py no Hugging Face library is preloaded,
only torch, bitsandbytes (with torch's compiler) and the stage-6 libraries: the script sets the
hub's variables before it imports the Hugging Face libraries, which read them at import. A
variable read as a process starts (PYTHONPATH, the locale, OpenMP's as torch loads) cannot reach
a fork: a test that sets one runs the script in a fresh process (conftest.forkable); the others
share the zygote's, OMP_WAIT_POLICY=PASSIVE among them, the value the LoRA script would set.

Protocol, one connection per run: the client sends one JSON line {"argv", "cwd", "env"} with
three descriptors (stdin, stdout, stderr) attached; the server answers "pid N\n" once the
child runs, then "exit CODE\n" (the Popen convention: -SIGNAL when a signal ended it).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import sys
import threading


def preload(modules: list[str]) -> None:
    import importlib

    # as dspy_example.py sets it before it imports LiteLLM: no price list download
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    for name in modules:
        module = importlib.import_module(name)
        if name == "transformers":  # a lazy module: the classes the similarity score loads
            module.AutoModel, module.AutoTokenizer, module.BertModel  # noqa: B018
    if "dspy" in modules or "openai" in modules:
        parse_encodings()


def parse_encodings() -> None:
    """tiktoken's two encodings, parsed here once: 1.5 s of every run of the DSPy script
    (LiteLLM's token counter) and 1 s of the OpenAI one (o200k_base) otherwise.

    tiktoken keeps each encoding it has built, by name, for the process; the files are the copies
    LiteLLM ships, the ones both scripts read offline. A child that counts tokens gets the same
    encoding, built from the same bytes; whether a script finds the files (its "not on this
    machine" path) is a check of its own on the disk, which this changes nothing of.
    """
    import importlib.util

    import tiktoken

    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = os.path.join(next(iter(spec.submodule_search_locations)), "litellm_core_utils")
    before = dict(os.environ)
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.join(folder, "tokenizers")
    try:
        for name in ("o200k_base", "cl100k_base"):
            tiktoken.get_encoding(name)
    finally:
        os.environ.clear()
        os.environ.update(before)


def receive(conn: socket.socket) -> tuple[dict, list[int]]:
    fds = array.array("i")
    data, ancillary, _, _ = conn.recvmsg(1 << 20, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            break
        data += more
    return json.loads(data), list(fds)


def run_child(request: dict, fds: list[int]) -> None:
    """In the forked child: become `python SCRIPT ARGS` in the test's directory, then exit."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if os.environ.get("NETBLOCK_LOG"):  # the block again, reporting to this test's log
        import sitecustomize

        sitecustomize.install(os.environ["NETBLOCK_LOG"])
    sys.argv = list(request["argv"])
    sys.path[0] = request["cwd"]
    import runpy

    # An uncaught exception other than SystemExit goes on to Python's own exit (traceback, 1).
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as stop:
        leave(stop.code)
    leave(0)  # falling off the end exits 0, as the script's own process would


def leave(code) -> None:
    """Exit as Py_FinalizeEx begins (threads joined, atexit, streams flushed), then at once."""
    import atexit

    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # sys.exit("message"), as Python prints it
        code = 1
    threading._shutdown()  # waits for the threads that are not daemons, as Python's exit does
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code or 0)


def serve(path: str) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        request, fds = receive(conn)
        pid = os.fork()
        if pid == 0:
            listener.close()
            conn.close()
            run_child(request, fds)
            sys.exit(0)
        for fd in fds:
            os.close(fd)
        conn.sendall(f"pid {pid}\n".encode())
        threading.Thread(target=report_exit, args=(conn, pid), daemon=True).start()


def report_exit(conn: socket.socket, pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    with conn, contextlib.suppress(OSError):  # OSError: the test gave up waiting
        conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())


if __name__ == "__main__":
    preload(sys.argv[2:])
    serve(sys.argv[1])
