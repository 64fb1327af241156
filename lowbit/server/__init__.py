"""OpenAI-compatible HTTP server on the engine (`lowbit serve`): FastAPI + uvicorn.

    from lowbit.server import AsyncEngine, EngineSpec, ServerConfig, create_app, run_server
    aengine = AsyncEngine(EngineSpec(model="path/to/model", max_num_seqs=64))
    aengine.start()                                     # the engine process loads the model
    run_server(create_app(aengine, tokenizer, ServerConfig(served_model_name="smollm2")), port=8000)

engine_core.py runs the engine in its own process (model, scheduler, steps); async_engine.py is the
server's end of its pipe; protocol.py (OpenAI request models, error body, response builders) <-
handlers.py (validate, stream, collect) <- app.py (routes, guard middleware, error handlers); metrics.py
is the Prometheus registry; launch.py runs uvicorn with a graceful drain.
"""
from lowbit.server.app import ServerConfig, create_app
from lowbit.server.async_engine import AsyncEngine
from lowbit.server.engine_core import EngineSpec
from lowbit.server.launch import run as run_server

__all__ = ["AsyncEngine", "EngineSpec", "ServerConfig", "create_app", "run_server"]
