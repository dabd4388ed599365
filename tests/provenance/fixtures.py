"""Files that declare their origin, made here: C2PA-signed JPEGs (a test certificate chain made with
``cryptography``), XMP with IPTC digital source types, the web UIs' PNG text chunks, EXIF naming a
generator, images watermarked with invisible-watermark's encoder, and hostile ones."""

from __future__ import annotations

import datetime
import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, PngImagePlugin

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"


def photo(seed: int = 0, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A smooth random picture (smooth so JPEG keeps it and the watermark has room)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(size[1] // 8, 2), max(size[0] // 8, 2), 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# -- certificates and C2PA ----------------------------------------------------------------------------

@dataclass
class Chain:
    """A root CA, an intermediate CA and a signer whose certificate has the uses C2PA asks for."""

    root_pem: bytes
    chain_pem: bytes  # signer first, then the intermediate
    key_pem: bytes
    signer_name: str


def make_chain(name: str = "Test Signer", organisation: str = "tidy-detect tests") -> Chain:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def subject(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, organisation)])

    def usage(signing: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=signing, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=not signing,
                             crl_sign=not signing, encipher_only=False, decipher_only=False)

    def issue(key, subject_name, issuer_key, issuer_name, ca: bool, path_length=None):
        builder = (x509.CertificateBuilder().subject_name(subject_name).issuer_name(issuer_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
                   .add_extension(usage(not ca), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                  critical=False))
        if not ca:  # C2PA wants a signer certified for e-mail protection or document signing, not "any"
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                                            critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    root_key, mid_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = issue(root_key, subject(f"{organisation} root"), root_key, subject(f"{organisation} root"), True, 1)
    mid = issue(mid_key, subject(f"{organisation} intermediate"), root_key, subject(f"{organisation} root"), True, 0)
    leaf = issue(leaf_key, subject(name), mid_key, subject(f"{organisation} intermediate"), False)
    pem = serialization.Encoding.PEM
    return Chain(root.public_bytes(pem), leaf.public_bytes(pem) + mid.public_bytes(pem),
                 leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
                 name)


def sign(image_bytes: bytes, chain: Chain, source_type: str = "trainedAlgorithmicMedia",
         generator: str = "Test Generator", mime: str = "image/jpeg") -> bytes:
    """The image with a C2PA manifest: a c2pa.created action of ``source_type``, signed by ``chain``."""
    import c2pa

    manifest = {"claim_generator_info": [{"name": generator, "version": "1.0"}], "title": "test image",
                "format": mime,
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                    {"action": "c2pa.created", "digitalSourceType": IPTC + source_type,
                     "softwareAgent": {"name": generator}}]}}]}
    info = c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain.chain_pem, chain.key_pem, None)
    context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}},
                                      "verify": {"verify_after_sign": False}})
    out = io.BytesIO()
    with context, c2pa.Signer.from_info(info) as signer, c2pa.Builder(manifest, context) as builder:
        builder.sign(signer, mime, io.BytesIO(image_bytes), out)
    return out.getvalue()


def tamper_pixels(jpeg: bytes) -> bytes:
    """The same JPEG with bytes of its image data changed (after the manifest, before the end)."""
    data = bytearray(jpeg)
    scan = data.rfind(b"\xff\xda")
    spot = scan + (len(data) - scan) // 2
    data[spot] ^= 0x5A
    data[spot + 1] ^= 0x3C
    return bytes(data)


# -- XMP, PNG text, EXIF -----------------------------------------------------------------------------

def xmp_packet(source_type: str | None = "trainedAlgorithmicMedia", creator_tool: str | None = None,
               as_element: bool = False) -> bytes:
    attributes, elements = "", ""
    if source_type:
        if as_element:
            elements += f"<Iptc4xmpExt:DigitalSourceType>{IPTC}{source_type}</Iptc4xmpExt:DigitalSourceType>"
        else:
            attributes += f' Iptc4xmpExt:DigitalSourceType="{IPTC}{source_type}"'
    if creator_tool:
        attributes += f' xmp:CreatorTool="{creator_tool}"'
    return (f'<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description rdf:about="" xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
            f'xmlns:xmp="http://ns.adobe.com/xap/1.0/"{attributes}>{elements}</rdf:Description>'
            f'</rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode("utf-8")


BILLION_LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + b"".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">'.encode()
                             for i in range(1, 10))
                  + b']><x:xmpmeta xmlns:x="adobe:ns:meta/">&lol9;</x:xmpmeta>')


def jpeg_with_segment(jpeg: bytes, marker: int, body: bytes) -> bytes:
    """A JPEG with one more segment right after SOI."""
    return jpeg[:2] + struct.pack(">BBH", 0xFF, marker, len(body) + 2) + body + jpeg[2:]


def jpeg_with_xmp(packet: bytes, image: Image.Image | None = None) -> bytes:
    return jpeg_with_segment(encode(image or photo(), "JPEG", quality=92), 0xE1,
                             b"http://ns.adobe.com/xap/1.0/\x00" + packet)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_chunks(*chunks: bytes, image: Image.Image | None = None) -> bytes:
    """A PNG with raw chunks inserted after IHDR."""
    data = encode(image or photo(), "PNG")
    ihdr_end = 8 + 25
    return data[:ihdr_end] + b"".join(chunks) + data[ihdr_end:]


def png_with_xmp(packet: bytes) -> bytes:
    return png_with_chunks(png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + packet))


def webp_with_xmp(packet: bytes) -> bytes:
    """A WebP (extended format) with an XMP chunk."""
    plain = encode(photo(), "WEBP", lossless=True)
    width, height = photo().size
    vp8x = b"VP8X" + struct.pack("<I", 10) + bytes([0x04, 0, 0, 0]) + (width - 1).to_bytes(3, "little") + \
        (height - 1).to_bytes(3, "little")
    body = plain[12:]
    xmp = b"XMP " + struct.pack("<I", len(packet)) + packet + (b"\x00" if len(packet) % 2 else b"")
    chunks = vp8x + body + xmp
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WEBP" + chunks


A1111_PARAMETERS = ("a lighthouse on a cliff at dusk, oil painting\nNegative prompt: blurry\n"
                    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
                    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: v1.7.0")
COMFY_PROMPT = ('{"3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20}}, '
                '"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}}}')
COMFY_WORKFLOW = '{"last_node_id": 9, "nodes": [{"id": 4, "type": "CheckpointLoaderSimple", "widgets_values": ["sd_xl_base_1.0.safetensors"]}]}'
NOVELAI_COMMENT = '{"prompt": "a cat", "steps": 28, "sampler": "k_euler_ancestral", "seed": 42}'
INVOKEAI_METADATA = '{"generation_mode": "txt2img", "model": {"name": "stable-diffusion-v1-5"}, "steps": 30}'


def png_with_text(texts: dict[str, str], image: Image.Image | None = None, compressed: bool = False) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        if compressed:
            info.add_itxt(key, value, zip=True)
        else:
            info.add_text(key, value)
    return encode(image or photo(), "PNG", pnginfo=info)


def jpeg_with_exif(software: str | None = None, description: str | None = None,
                   user_comment: bytes | None = None) -> bytes:
    exif = Image.Exif()
    if software:
        exif[0x0131] = software
    if description:
        exif[0x010E] = description
    if user_comment is not None:
        exif.get_ifd(0x8769)[0x9286] = user_comment
    return encode(photo(), "JPEG", quality=92, exif=exif.tobytes())


def watermarked_png(payload: bytes | list[int] = b"StableDiffusionV1", size: tuple[int, int] = (512, 512),
                    seed: int = 0) -> bytes:
    """A PNG marked as Stable Diffusion's reference scripts mark their outputs (``payload``: bytes, or
    a list of bits as the SDXL scripts give)."""
    import cv2
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bits" if isinstance(payload, list) else "bytes", payload)
    bgr = cv2.cvtColor(np.array(photo(seed, size)), cv2.COLOR_RGB2BGR)
    marked = encoder.encode(bgr, "dwtDct")
    return encode(Image.fromarray(cv2.cvtColor(marked, cv2.COLOR_BGR2RGB)), "PNG")


def sign_remote(image_bytes: bytes, chain: Chain, url: str = "http://127.0.0.1:9/manifest.c2pa") -> bytes:
    """A JPEG whose C2PA manifest is not embedded, only referred to by ``url`` (in its XMP)."""
    import c2pa

    manifest = {"claim_generator_info": [{"name": "Remote Generator", "version": "1.0"}], "format": "image/jpeg",
                "assertions": []}
    info = c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain.chain_pem, chain.key_pem, None)
    context = c2pa.Context.from_dict({"builder": {"thumbnail": {"enabled": False}},
                                      "verify": {"verify_after_sign": False}})
    out = io.BytesIO()
    with context, c2pa.Signer.from_info(info) as signer, c2pa.Builder(manifest, context) as builder:
        builder.set_no_embed()
        builder.set_remote_url(url)
        builder.sign(signer, "image/jpeg", io.BytesIO(image_bytes), out)
    return out.getvalue()
