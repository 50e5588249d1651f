"""A species classifier for measuring variations: a linear classifier on the Inception v3 features the FID uses
(vae.fid), fitted on the training images' labels only.

A variation that keeps its photo's kind is one this classifier puts in the photo's species as often as it puts
real photos of that species there. Its accuracy on real held-out photos is the ceiling of that share.
"""

import numpy as np

from vae.errors import UserError


def fit_species_classifier(features, labels, seed=0):
    """A multinomial logistic regression (scikit-learn, L2, C = 1) on standardised features (N, 2048) and their
    class labels (N,); returns a function features -> predicted labels."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        raise UserError("the species classifier needs scikit-learn: pip install -r requirements.txt") from None
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        raise UserError("the species classifier needs training images of at least two classes (Flowers102's "
                        "imagelabels.mat)")
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    classifier.fit(np.asarray(features), labels)
    return classifier.predict
