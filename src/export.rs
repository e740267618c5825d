//! Exports and the live registry the server looks them up in. Placeholder: see issue 5.
