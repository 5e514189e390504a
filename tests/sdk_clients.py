"""Drive a running `sly-unet serve` with the Supervisely SDK's own clients, unmodified; run by the SDK's
venv (build/sdk-venv, supervisely 6.74.51, no torch), never by ours:

    build/sdk-venv/bin/python tests/sdk_clients.py URL OUT.json IMAGE [IMAGE ...]

Writes what each client call returned, as JSON, for tests/test_sdk_clients.py to compare with what
POST /model/inference answers. Annotations go through sly.Annotation (Session) and Prediction
(ModelAPI), so a JSON the SDK cannot read fails here, in the SDK's own code.
"""

import json
import os
import sys

import supervisely as sly
from supervisely.nn.model.model_api import ModelAPI


def main(url: str, out: str, images: list) -> None:
    # Session needs an Api for its retry count and token; with session_url it never calls the platform.
    api = sly.Api(server_address="http://127.0.0.1:9", token="x" * 128, ignore_task_id=True)
    session = sly.nn.inference.Session(api, session_url=url)
    result = {
        "session_info": session.get_session_info(),
        "model_meta": session.get_model_meta().to_json(),
        "default_settings": session.get_default_inference_settings(),
        "deploy_info": vars(session.get_deploy_info()),
        "image_path": session.inference_image_path(images[0]).to_json(),
        "image_paths": [ann.to_json() for ann in session.inference_image_paths(images)],
    }
    session.set_inference_settings({"name": "sliding_window", "window": {"width": 40, "height": 40}, "tta": True})
    result["image_path_sliding_window"] = session.inference_image_path(images[0]).to_json()
    classes = [c.name for c in session.get_model_meta().obj_classes][:1]
    session.set_inference_settings({"classes": classes})
    result["classes"] = classes
    result["image_path_classes"] = session.inference_image_path(images[0]).to_json()

    model = ModelAPI(url=url)
    result["model_info"] = model.get_info()
    result["model_classes"] = model.get_classes()
    result["model_settings"] = model.get_settings()
    result["model_is_deployed"] = model.is_deployed()
    result["predict_one"] = [p.annotation.to_json() for p in model.predict(input=images[0])]
    result["predict_list"] = [p.annotation.to_json() for p in model.predict(input=[images[0]])]
    # A folder: the SDK sends every image in it, in its own order; the server names each result.
    result["predict_dir"] = {p.name: p.annotation.to_json() for p in model.predict(input=os.path.dirname(images[0]))}
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
