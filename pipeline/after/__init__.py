"""After labeling: the commands that read finished labels (``diffseg eval | export | show``)
and the training reader. cli (their argparse), evaluate + baselines + datasets_gt,
export, gallery, image_index (a label row's source image), reader (training pairs),
method (which grouping made the labels, from the manifest).
"""
