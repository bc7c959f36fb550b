"""Scale-out on Ray Serve (`python app.py --backend ray ...`, docs/scale-out.md).

`config` (the flags as a validated `ScaleOut`; no Ray needed), `replica` (the Serve deployment that
runs Calls on a loaded model, one at a time), `backend` (`RayBackend`: the front end's side, which
starts or joins Ray, deploys one deployment per model kind and streams each Call's steps back),
`service` (the same deployment as a Serve application builder, for a KubeRay RayService or `serve run`).
Ray is imported only by `replica` and `backend`, and only when the Ray backend is chosen; the
library (ldm/) never imports any of this.
"""
