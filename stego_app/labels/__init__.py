"""Naming discovered clusters, in three modules.

- stego_app.labels.mapping: read and edit a run's cluster -> label mapping (list_clusters,
  legend, name_cluster, rename_label, merge_clusters, unmerge_cluster, ignore_cluster,
  set_label_colour).
- stego_app.labels.views: overlays and example thumbnails (render_segmentation,
  cluster_examples, examples_of_clusters, read_segments).
- stego_app.labels.annotations: seed annotations and checked images (seed_annotations,
  confirm_image, confirmed_count).
"""
