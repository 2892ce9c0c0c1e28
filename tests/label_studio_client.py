"""Run by tests/test_label_studio.py with Label Studio's own virtual environment (its SDK is installed
there, not in ours): create a project and an image task, connect the samadapt backend, ask for an
interactive prediction (a click, then a box) and for pre-annotations of the task, read them back, and
print what came back as JSON (brush masks decoded by the SDK's own RLE decoder).

    python tests/label_studio_client.py LS_URL TOKEN BACKEND_URL IMAGE.png OUTPUT[brush|polygon] EXTRA_JSON
"""
import base64
import json
import sys

import numpy as np
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import decode_rle

ls_url, token, backend, image, output, extra = sys.argv[1:7]
TAG = {"brush": "BrushLabels", "polygon": "PolygonLabels"}[output]
CONFIG = f"""<View>
  <Image name="image" value="$image" zoom="true"/>
  <{TAG} name="tag" toName="image"><Label value="object" background="red"/></{TAG}>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="object" smart="true"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="object" smart="true"/></RectangleLabels>
</View>"""

with open(image, "rb") as fh:
    uri = "data:image/png;base64," + base64.b64encode(fh.read()).decode("ascii")

ls = LabelStudio(base_url=ls_url, api_key=token)
project = ls.projects.create(title=f"samadapt {output}", label_config=CONFIG)
ls.projects.import_tasks(id=project.id, request=[{"image": uri}])
tasks = list(ls.tasks.list(project=project.id))
ml = ls.ml.create(project=project.id, url=backend, title="samadapt", is_interactive=True,
                  extra_params=json.loads(extra))
out = {"project": project.id, "task": tasks[0].id, "ml": ml.id, "ml_state": ls.ml.get(id=ml.id).state}


def decode(result):
    v = result["value"]
    h, w = result["original_height"], result["original_width"]
    if result["type"] == "brushlabels":
        alpha = np.reshape(decode_rle(v["rle"]), (h, w, 4))[:, :, 3]
        return {"type": "brush", "mask": (alpha > 0).astype(int).tolist(), "labels": v["brushlabels"]}
    return {"type": "polygon", "points": v["points"], "labels": v["polygonlabels"]}


W, H = 64, 48
contexts = {
    "click": {"result": [{"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": W,
                          "original_height": H, "is_positive": True,
                          "value": {"x": 100 * 24 / W, "y": 100 * 20 / H, "width": 1, "keypointlabels": ["object"]}}]},
    "box": {"result": [{"type": "rectanglelabels", "from_name": "rect", "to_name": "image", "original_width": W,
                        "original_height": H,
                        "value": {"x": 100 * 10 / W, "y": 100 * 8 / H, "width": 100 * 30 / W, "height": 100 * 26 / H,
                                  "rectanglelabels": ["object"]}}]},
}
for name, ctx in contexts.items():
    raw = ls.ml.with_raw_response.predict_interactive(id=ml.id, task=tasks[0].id, context=ctx)
    body = raw._response.json()  # the SDK types this call's answer as None; the body is Label Studio's
    res = body["data"]["result"]
    out[name] = {"score": body["data"].get("score"), "results": [decode(r) for r in res]}

# pre-annotation of every task, stored by Label Studio, read back through the SDK
ls.actions.create(id="retrieve_tasks_predictions", project=project.id, selected_items={"all": True, "excluded": []})
preds = list(ls.predictions.list(task=tasks[0].id))
out["stored"] = [{"model_version": p.model_version, "score": p.score, "results": [decode(r) for r in p.result]}
                 for p in preds]
print("@@" + json.dumps(out))
