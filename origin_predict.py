"""Show or measure the book's FCN trained by origin_train.py.

    python origin_predict.py               # pictures/origin_out.png: image / ground truth / prediction for 4 val images
    python origin_predict.py --eval        # full-resolution metrics over the whole val split, as JSON and a table
    python origin_predict.py --images photos/ --save-dir predictions   # NAME.png (class indices), NAME_overlay.jpg
    python origin_predict.py --serve       # http://127.0.0.1:8000/: drop a photo, see the FCN's prediction
"""
from support.cli import predict_arg_parser, predict_config
from support.errors import run_main
from support.prediction import run_prediction


def main(argv: list[str] | None = None) -> None:
    p = predict_arg_parser(__doc__.splitlines()[0], "runs/origin/best.pt", "pictures/origin_out.png")
    run_prediction(predict_config(vars(p.parse_args(argv))), network="fcn")


if __name__ == "__main__":
    run_main(main)
