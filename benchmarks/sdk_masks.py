"""The Supervisely SDK drawing and writing the class masks that `sly-unet masks` writes, as a user would
script it: run by the SDK's own interpreter (benchmarks/masks.py, --sdk-python), never imported here.

    python sdk_masks.py PROJECT OUT [BACKGROUND NEUTRAL]
"""

import json
import os
import sys

import cv2
import numpy as np
import supervisely as sly


def main() -> None:
    project_dir, out_dir = sys.argv[1], sys.argv[2]
    background, neutral = (sys.argv[3], sys.argv[4]) if len(sys.argv) > 4 else ("bg", "neutral")
    meta = sly.ProjectMeta.from_json(sly.json.load_json_file(os.path.join(project_dir, "meta.json")))
    # The plugin's class indices: background 0, the other titles sorted from 1, neutral 255.
    others = sorted({c.name for c in meta.obj_classes} - {background, neutral})
    index = {background: 0, neutral: 255, **{title: i for i, title in enumerate(others, start=1)}}
    count = 0
    for dataset in sorted(d for d in os.listdir(project_dir) if os.path.isdir(os.path.join(project_dir, d))):
        ann_dir = os.path.join(project_dir, dataset, "ann")
        os.makedirs(os.path.join(out_dir, dataset), exist_ok=True)
        for ann_name in sorted(os.listdir(ann_dir)):
            doc = sly.json.load_json_file(os.path.join(ann_dir, ann_name))
            # The image tags (train / val) are not in meta.json, which the SDK refuses; masks do not need them.
            doc["tags"] = []
            ann = sly.Annotation.from_json(doc, meta)
            mask = np.zeros(ann.img_size, np.uint8)
            for label in ann.labels:
                label.draw(mask, color=index[label.obj_class.name])
            image_name = ann_name[: -len(".json")]
            cv2.imwrite(os.path.join(out_dir, dataset, f"{image_name}.png"), mask)
            count += 1
    with open(os.path.join(out_dir, "class_title_to_idx.json"), "w") as file:
        json.dump(index, file, indent=4)
    print(f"wrote {count} masks")


if __name__ == "__main__":
    main()
