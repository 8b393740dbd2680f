"""flashsae inside other people's tools. One module per client; each imports its client only when
used, and says which extra to install when it is missing:

    flashsae.integrations.saelens           SAELens: in-memory conversion both ways, and the
                                            "flashsae_topk" training architecture (pip install 'flashsae[saelens]')
    flashsae.integrations.saebench          SAEBench's custom-SAE interface (pip install 'flashsae[saebench]')
    flashsae.integrations.transformer_lens  capture / splice / steer by HookedTransformer hook names
                                            (pip install 'flashsae[transformer-lens]')
    flashsae.integrations.nnsight           capture / splice / steer inside an nnsight trace
                                            (pip install 'flashsae[nnsight]')

Importing this package imports none of them (``import flashsae`` never does either).
"""
