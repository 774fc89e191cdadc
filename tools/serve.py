"""`serve`: a local web page to sample, repair, compress and score images with trained models.

    serve --prior runs/stage2_transformer/latest/checkpoints/best.ckpt     # then open http://127.0.0.1:7860/

Loads the models once, then serves one hand-written page (tools/web/: no external fonts, scripts or
telemetry; it works with no network) and its JSON API (:mod:`tools.webapp`). Binds to 127.0.0.1 unless
``--host`` says otherwise; ``--port 0`` picks a free port (the line printed at start names it). Model work
runs one request at a time, in arrival order; uploads are limited to ``--max_upload_mb`` per request.
The stage-1 checkpoint is the one the prior's codes metadata names (checked by SHA-256) unless ``--vqvae``
is given. Ctrl-C stops it.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import time

import uvicorn

from common.cli import UserError, add_device, make_parser, resolve_device, run_command
from tools.load import load_models
from tools.playground import CFG_SCALE, TEMPERATURE, Playground, checked
from tools.transform_net import AnomalyNet
from tools.webapp import create_app


def build_parser():
    p = make_parser("serve", __doc__)
    p.add_argument("--prior", type=str, required=True, help="stage-2 prior checkpoint (.ckpt)")
    p.add_argument("--vqvae", type=str, help="stage-1 checkpoint (default: the one the prior's codes came from)")
    p.add_argument("--host", type=str, default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="TCP port (0: any free port)")
    p.add_argument("--max_upload_mb", type=float, default=10.0, help="largest request body accepted, in MB")
    p.add_argument("--anomaly_net", type=str, default=None,
                   help="a train_anomaly_net file: the Anomaly tab adds transform_knn and ranks by it")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait for the models before 503")
    p.add_argument("--temperature", type=float, default=1.0, help="the Sample tab's starting temperature")
    p.add_argument("--temperature_end", type=float, default=None,
                   help="the Sample tab's starting end temperature (default: none, a constant temperature)")
    p.add_argument("--cfg_scale", type=float, default=1.0,
                   help="the Sample tab's starting guidance scale (`make serve`: the demo's 4, temperature 1.0 -> 1.4)")
    add_device(p)
    return p


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, or a UserError saying why not (port in use, no such address)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a name such as localhost
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        sock.close()
        hint = "; pick another --port (or 0 for any free one)" if e.errno == 98 else ""
        raise UserError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}{hint}") from None
    return sock


def build_server(args: list[str] | None) -> tuple[uvicorn.Server, socket.socket, str]:
    """Parse, check, listen, load the models: (the server, ready to run on the socket; the page's URL)."""
    a = build_parser().parse_args(args)
    if not 0 <= a.port <= 65535:
        raise UserError(f"--port must be in [0, 65535], got {a.port}")
    if not 0 < a.max_upload_mb <= 1000:
        raise UserError(f"--max_upload_mb must be in (0, 1000], got {a.max_upload_mb}")
    if a.queue < 1:
        raise UserError(f"--queue must be >= 1, got {a.queue}")
    try:  # the bounds the page's form is checked against
        checked("--temperature", a.temperature, *TEMPERATURE, low_open=True)
        if a.temperature_end is not None:
            checked("--temperature_end", a.temperature_end, *TEMPERATURE, low_open=True)
        checked("--cfg_scale", a.cfg_scale, *CFG_SCALE)
    except ValueError as e:
        raise UserError(str(e)) from None
    device = resolve_device(a.device)
    sock = listen(a.host, a.port)  # before the slow part: a busy port is reported at once
    try:
        models = load_models(a.prior, a.vqvae, device)
        fits = (models.channels, models.image_size)
        anomaly_net = AnomalyNet.load(a.anomaly_net, device, fits=fits) if a.anomaly_net else None
        defaults = {"temperature": a.temperature, "cfg_scale": a.cfg_scale}
        if a.temperature_end is not None:  # else the field stays empty: a constant temperature
            defaults["temperature_end"] = a.temperature_end
        play = Playground(models, anomaly_net=anomaly_net, sample_defaults=defaults)
        play.sample(None, 1, 1.0, 1.0, 1.0, 0)  # warm-up: the first click then costs what every click costs
        loopback = ipaddress.ip_address(sock.getsockname()[0]).is_loopback  # else any Host name may be this one
        app = create_app(play, int(a.max_upload_mb * 1e6), a.queue, loopback_only=loopback)
        # The test images are read on the model thread, before any request that could need them.
        app.state.queue.pool.submit(play.load_test_images)
    except BaseException:
        sock.close()
        raise
    # limit_concurrency: past it a connection gets a 503 at once, so idle clients cannot use up the process's
    # files (1,100 of them made /api/health time out under a 1,024-file limit)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3,
                            limit_concurrency=256)  # fmt: skip
    host, port = sock.getsockname()[:2]
    return uvicorn.Server(config), sock, f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def _run(args: list[str] | None) -> str:
    t0 = time.perf_counter()
    server, sock, url = build_server(args)
    if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
        print("serve: note: listening on a non-loopback address: other machines can reach this page", file=sys.stderr)
    print(f"serve: {url} (ready in {time.perf_counter() - t0:.1f} s; Ctrl-C stops)", flush=True)
    with sock:
        server.run(sockets=[sock])
    return "serve: stopped"


def main(args: list[str] | None = None) -> None:
    run_command("serve", _run, args, memory_flag=None)


if __name__ == "__main__":
    main()
